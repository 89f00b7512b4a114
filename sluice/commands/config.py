"""Show a run config resolved: the file's values over the defaults, with each field's help.

``sluice config show RUN.yaml [--set k=v ...]`` prints commented YAML (each field's description,
and its default where the config changes it) that is itself a valid config file; ``--table``
prints a table instead. Without a file, the defaults. A bad value exits 2 naming the field, the
value and what is allowed. A password in ``redis.url`` is printed as ``***``. The task's options
(``task.options``) are listed one by one with their meaning and default (a required one not
given is a ``# REQUIRED`` comment); ``--set task.name=jsonl`` shows another task's.
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


def task_option_rows(cfg: Any) -> list[tuple[str, Any, Any, str, bool]] | None:
    """``(option, value, default, help, required_and_missing)`` for each option of the
    config's task (``rollout_workers.tasks.task_options``: the given value, else the
    default), then any other given option; None when the task does not declare its options."""
    from rollout_workers.tasks import task_options

    opts = task_options(cfg.task.name)
    if opts is None:
        return None
    given = cfg.task.options
    out = [
        (
            o.name,
            given.get(o.name, o.default),
            o.default,
            o.help,
            o.required and o.name not in given,
        )
        for o in opts
    ]
    known = {o.name for o in opts}
    out += [
        (k, v, None, "not an option of this task", False)
        for k, v in given.items()
        if k not in known
    ]
    return out


def _task_options_yaml(cfg: Any, indent: str) -> list[str]:
    """``options:`` with each option of the task on its own line after its help; a required
    option not given is a comment (fill it in)."""
    opts = task_option_rows(cfg)
    if opts is None:
        return [f"{indent}options: {_yaml_value(cfg.task.options)}"]
    shown = [o for o in opts if not o[4]]
    lines = [f"{indent}options:" + ("" if shown else " {}")]
    for name, value, default, help_text, missing in opts:
        note = ("REQUIRED: " if missing else "") + help_text
        if not missing and value != default:
            note += f" [default: {_yaml_value(default)}]"
        for chunk in textwrap.wrap(note, 92) or [""]:
            lines.append(f"{indent}  # {chunk}")
        lines.append(
            f"{indent}  {'# ' if missing else ''}{name}: {'' if missing else _yaml_value(value)}".rstrip()
        )
    return lines


def commented_yaml(cfg: Any) -> str:
    """The config as YAML, each field preceded by its help text (and default, when changed);
    the task's options one by one, with their help and defaults."""
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
        if (section, name) == ("task", "options"):
            lines += _task_options_yaml(cfg, "  ")
            continue
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
        if (section, name) == ("task", "options"):
            for opt, v, d, h, missing in task_option_rows(cfg) or []:
                shown = "(required)" if missing else escape(_yaml_value(v))
                table.add_row(
                    f"task.options.{opt}",
                    f"[bold]{shown}[/bold]" if missing or v != d else shown,
                    "" if missing else escape(_yaml_value(d)),
                    escape(h),
                )
    Console().print(table)
    return 0
