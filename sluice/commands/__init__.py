"""One module per ``sluice`` command: ``add_arguments(parser)`` and ``run(args) -> int``."""

from __future__ import annotations


def log_task_stacks_on_sigusr2() -> None:
    """From now on SIGUSR2 logs the stack of every asyncio task of the running loop: where a
    live but stuck process waits (the fault suite asks before it SIGKILLs a process that
    ignored SIGTERM). SIGUSR1 gives every thread's stack (``sluice.cli``)."""
    import asyncio
    import logging
    import signal

    loop = asyncio.get_running_loop()

    def dump() -> None:
        lines = []
        for task in asyncio.all_tasks(loop):
            lines.append(f"task {task.get_name()}:")
            lines += [f"  {frame}" for frame in _await_chain(task.get_coro())]
        logging.getLogger("sluice").warning("SIGUSR2: asyncio tasks:\n%s", "\n".join(lines))

    loop.add_signal_handler(signal.SIGUSR2, dump)


def _await_chain(coro: object) -> list[str]:
    """``file:line function`` of every coroutine (or generator) ``coro`` is awaiting, outermost
    first: where a suspended task waits, which ``Task.print_stack`` does not show."""
    out = []
    while coro is not None:
        frame = next(
            (f for a in ("cr_frame", "gi_frame", "ag_frame") if (f := getattr(coro, a, None))),
            None,
        )
        if frame is not None:
            out.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        coro = next(
            (c for a in ("cr_await", "gi_yieldfrom", "ag_await") if (c := getattr(coro, a, None))),
            None,
        )
    return out
