"""How values cross between psycopg and the wire: the adapters every server
connection and the placeholder conversion use, built once at start-up."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.adapt import AdaptersMap
from psycopg.types.json import JsonbDumper
from psycopg.types.string import TextLoader

from client import protocol

# Types msgpack does not carry come back as PostgreSQL's text form.
_TEXT_TYPES = (
    "inet", "cidr", "macaddr", "macaddr8",
    "int4range", "int8range", "numrange", "daterange", "tsrange", "tstzrange",
    "int4multirange", "int8multirange", "nummultirange", "datemultirange",
    "tsmultirange", "tstzmultirange",
)


class _WireJsonDumper(JsonbDumper):
    """Binds ``client.Json`` parameters as jsonb."""

    def dump(self, obj: Any) -> bytes:
        return super().dump(obj.obj)


def build_adapters() -> AdaptersMap:
    adapters = AdaptersMap(psycopg.adapters)
    adapters.register_dumper(dict, JsonbDumper)
    adapters.register_dumper(protocol.Json, _WireJsonDumper)
    for name in _TEXT_TYPES:
        adapters.register_loader(name, TextLoader)
    return adapters
