"""How a ``sluice`` command fails: one line on stderr, exit 2 (bad input) or 1 (environment).

``sluice.cli.main`` maps every error below to ``sluice COMMAND: MESSAGE`` and its exit code,
without a traceback; a command raises one instead of printing and exiting itself. The
components' own error types (they cannot import ``sluice``) are listed in ``COMPONENT_ERRORS``
by module and class name, looked up only when that module was imported (``sluice --help``
imports none of them). The list of messages a user can meet is in docs/reliability.md.
"""

from __future__ import annotations

import sys

BAD_INPUT = 2
"""Exit code of an input the user can fix: a config value, a flag, a data file, a model dir."""
ENVIRONMENT = 1
"""Exit code of a problem outside the input: Redis unreachable, a port in use, SGLang absent."""


class InputError(ValueError):
    """Bad input (exit 2): the message names the input and what to do."""


class EnvironmentProblem(RuntimeError):
    """The environment is not as needed (exit 1): the message names what and how to fix it."""


COMPONENT_ERRORS: tuple[tuple[str, str, int], ...] = (
    # (module, class, exit code); the first that matches wins, so subclasses come first.
    ("buffer.connection", "RedisAuthFailed", BAD_INPUT),
    ("buffer.connection", "RedisUnavailable", ENVIRONMENT),
    ("inference.launch", "EngineUnavailable", ENVIRONMENT),
    ("inference.cpu_server.app", "CannotListen", ENVIRONMENT),
    ("inference.models", "ModelDirError", BAD_INPUT),
    ("rollout_workers.tasks.base", "TaskError", BAD_INPUT),
    ("staleness.records", "RunSettingsMismatch", BAD_INPUT),
    ("trainer.config", "TrainerEnvironmentError", ENVIRONMENT),
    ("trainer.config", "TrainerError", BAD_INPUT),
)


def exit_code(e: BaseException) -> int | None:
    """The exit code for ``e`` when it is an error a command reports in one line, else None
    (a bug: let its traceback show)."""
    if isinstance(e, InputError):
        return BAD_INPUT
    if isinstance(e, EnvironmentProblem):
        return ENVIRONMENT
    for module, name, code in COMPONENT_ERRORS:
        mod = sys.modules.get(module)
        cls = getattr(mod, name, None) if mod is not None else None
        if isinstance(cls, type) and isinstance(e, cls):
            return code
    return None


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line: the lines of a longer one joined by ``; `` (by a
    space after a line that ends with a colon, a heading)."""
    out = ""
    for part in (p.strip() for p in str(e).splitlines()):
        if part:
            out += ("" if not out else " " if out.endswith(":") else "; ") + part
    return out or type(e).__name__
