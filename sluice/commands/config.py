"""Show a run config resolved: the file's values over the defaults, with each field's help.

``sluice config show RUN.yaml [--set k=v ...]`` prints commented YAML (each field's description,
and its default where the config changes it) that is itself a valid config file; ``--table``
prints a table instead. Without a file, the defaults. A bad value exits 2 naming the field, the
value and what is allowed. A password in ``redis.url`` is printed as ``***``.
"""

from __future__ import annotations

import argparse
import textwrap
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    from sluice.config import add_config_arguments

    sub = p.add_subparsers(dest="config_cmd", metavar="ACTION", required=True)
    show = sub.add_parser("show", help="print the resolved config with defaults and help text")
    show.add_argument("config", nargs="?", default=None, help="run config YAML (default: none)")
    add_config_arguments(show, "trainer.lr=1e-5", config_help=None)
    show.add_argument("--table", action="store_true", help="a table instead of commented YAML")


def _yaml_value(value: Any) -> str:
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").strip()


def rows(cfg: Any) -> list[tuple[str, str, Any, Any, str]]:
    """``(section, field, value, default, help)`` for every field of ``cfg``, in model order;
    ``redis.url`` with its password redacted."""
    from buffer.connection import redact_url

    out = []
    for section_name, section_field in type(cfg).model_fields.items():
        section = getattr(cfg, section_name)
        defaults = section_field.default_factory() if section_field.default_factory else None
        for name, f in type(section).model_fields.items():
            value = section.model_dump(mode="json")[name]
            default = defaults.model_dump(mode="json")[name] if defaults is not None else None
            if section_name == "redis" and name == "url":
                value = redact_url(value)
                default = redact_url(default) if default is not None else None
            out.append((section_name, name, value, default, f.description or ""))
    return out


def commented_yaml(cfg: Any) -> str:
    """The config as YAML, each field preceded by its help text (and default, when changed)."""
    lines: list[str] = []
    current = None
    for section, name, value, default, help_text in rows(cfg):
        if section != current:
            if current is not None:
                lines.append("")
            lines.append(f"{section}:")
            current = section
        note = help_text
        if value != default:
            note += f" [default: {_yaml_value(default)}]"
        for chunk in textwrap.wrap(note, 96) or [""]:
            lines.append(f"  # {chunk}")
        lines.append(f"  {name}: {_yaml_value(value)}")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from sluice.config import load_config

    cfg = load_config(args.config, args.overrides)  # ConfigError: exit 2 in sluice.cli
    if not args.table:
        source = args.config or "defaults"
        n = len(args.overrides)
        extra = f" + {n} --set override{'s' if n != 1 else ''}" if n else ""
        print(f"# sluice config resolved from {source}{extra}")
        print(commented_yaml(cfg), end="")
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"config: {args.config or 'defaults'}", title_justify="left")
    for col in ("field", "value", "default", "help"):
        table.add_column(col, overflow="fold")
    for section, name, value, default, help_text in rows(cfg):
        changed = value != default
        shown = escape(_yaml_value(value))
        table.add_row(
            f"{section}.{name}",
            f"[bold]{shown}[/bold]" if changed else shown,
            escape(_yaml_value(default)),
            escape(help_text),
        )
    Console().print(table)
    return 0
