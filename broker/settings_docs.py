"""The settings' documents, written from their declaration in ``broker.config``.

``etc/poolbroker.toml`` is :func:`defaults_toml` (also ``poolbroker config
--defaults``) and README's settings table is :func:`markdown_table`, between
two marker lines.  ``python -m broker.settings_docs`` (``make docs``) rewrites
both; tests/test_config.py fails while either differs from the declaration.
"""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path
from typing import Literal, get_args, get_origin

from .config import (
    DEFAULT_POOL, ENV_PREFIX, POOL_SPECS, POOLS_TABLE, SPECS, TABLE, Settings, Spec, plain,
    toml_literal,
)

README_BEGIN = "<!-- settings table: written by `make docs` from broker/config.py -->\n"
README_END = "<!-- end of the settings table -->\n"

_HEADER = f"""\
# poolbroker settings, each commented out with its default.
# Precedence: command-line flag > environment variable > this file > default.
# A setting's environment variable is {ENV_PREFIX}<NAME> (max_connections:
# {ENV_PREFIX}MAX_CONNECTIONS) and its flag --<name-with-dashes>
# (poolbroker serve --max-connections 4).
# Give the file with: poolbroker serve --config etc/poolbroker.toml
# SIGHUP or `poolbroker ctl reload` re-reads it: "On reload: live" settings
# change at once, the others keep their value until a restart (logged).
# Written from broker/config.py by `make docs` (poolbroker config --defaults).

[{TABLE}]
"""


def _meaning(spec: Spec) -> str:
    choices = get_args(spec.kind) if get_origin(spec.kind) is Literal else ()
    listed = f" One of {', '.join(choices)}, in any case." if choices else ""
    return f"{spec.help}.{listed} {spec.doc}".strip()


def _on_reload(spec: Spec) -> str:
    """What a reload (SIGHUP, ``poolbroker ctl reload``) does with a changed value."""
    return "live" if spec.live else "restart"


_POOLS = f"""
# Several pools under one cap: one [{POOLS_TABLE}.NAME] table per other database
# or user. Clients choose one by name (client.Client(pool="reports"),
# postgresql+poolbroker:///reports); without a name they get the pool of dsn
# above, named "{DEFAULT_POOL}". Every pool's connections count against
# max_connections. A reload applies new pool sizes; a pool added, removed or
# given another dsn needs a restart.
# [{POOLS_TABLE}.reports]
"""


def _commented(spec: Spec, reload: bool) -> str:
    meaning = f"{_meaning(spec)} On reload: {_on_reload(spec)}." if reload else _meaning(spec)
    comment = textwrap.fill(plain(meaning), width=78, initial_indent="# ",
                            subsequent_indent="# ", break_on_hyphens=False)
    shown = spec.default if spec.example is None else spec.example
    return f"\n{comment}\n# {spec.name} = {toml_literal(shown)}\n"


def defaults_toml() -> str:
    """A TOML file of every setting, commented out with its default and meaning."""
    return "".join([_HEADER, *(_commented(spec, True) for spec in SPECS.values()), _POOLS,
                    *(_commented(spec, False) for spec in POOL_SPECS.values())])


def settings_toml(settings: Settings) -> str:
    """``settings`` as the ``[poolbroker]`` table of a TOML file, and its pools."""
    lines = [f"[{TABLE}]"]
    lines += [f"{name} = {toml_literal(getattr(settings, name))}" for name in SPECS]
    for pool in settings.pools:
        key = pool.name if re.fullmatch(r"[A-Za-z0-9_-]+", pool.name) else toml_literal(pool.name)
        lines += ["", f"[{POOLS_TABLE}.{key}]"]  # quoted: a dot would nest a table
        lines += [f"{name} = {toml_literal(getattr(pool, name))}" for name in POOL_SPECS]
    return "\n".join(lines) + "\n"


def markdown_table() -> str:
    """README's table: setting, environment variable, default, meaning."""
    def row(key: str, env: str, spec: Spec) -> str:
        default = spec.shown or f"`{spec.shown_default}`"
        meaning = _meaning(spec).replace("|", "\\|")
        return f"| `{key}` | {env} | {default} | {_on_reload(spec)} | {meaning} |"

    return "\n".join([
        "| setting | env | default | on reload | meaning |", "|---|---|---|---|---|",
        *(row(spec.name, f"`{spec.env}`", spec) for spec in SPECS.values()),
        *(row(f"{POOLS_TABLE}.NAME.{spec.name}", "(TOML only)", spec)
          for spec in POOL_SPECS.values()),
    ]) + "\n"


def readme_with_table(readme: str) -> str:
    """``readme`` with the text between the two marker lines replaced by the table."""
    start = readme.index(README_BEGIN) + len(README_BEGIN)
    end = readme.index(README_END, start)
    return readme[:start] + markdown_table() + readme[end:]


def main(root: Path) -> None:
    """Rewrite etc/poolbroker.toml and README.md under ``root``."""
    (root / "etc" / "poolbroker.toml").write_text(defaults_toml())
    readme = root / "README.md"
    readme.write_text(readme_with_table(readme.read_text()))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
