"""The broker's memory goes back to the system when a burst is over.

glibc serves large allocations with mmap (returned to the system when
freed) only below a threshold that it raises each time such a block is
freed: after one 4 MB request, every later 4 MB request comes from the
heap, which is not returned.  A burst of large requests would then keep
the broker's RSS at its peak for good.  Fixing the threshold turns the
adjustment off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger("poolbroker")

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 128 * 1024  # glibc's default, kept fixed


def return_large_buffers() -> bool:
    """Keep glibc's mmap threshold fixed; False where there is no glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        logger.debug("no mallopt: large buffers are returned as the allocator sees fit")
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
