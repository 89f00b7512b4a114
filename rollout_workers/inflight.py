"""The groups one rollout worker generates now, with their admission versions.

A group admitted at version ``v`` has every token at version ``v`` or later (the pool hands
its samples only to servers at least that new), and the trainer is at the current version or
later when it reads the group. So once the run reaches ``version`` (its weight event — a publication or an announcement —
arrived: the trainer trains at that version or later from now on), the group is at least
``staleness(version, (), admission_version=v)`` versions old when trained, and when that is
``past_eta`` the trainer would drop it: ``cancel_past_eta`` stops it instead of spending more
generation on it. The worker hands its slot back with reason ``cancelled_stale`` (apart from
the trainer's own drops, ``stale``) and requeues its prompt.

Invariant (tests/unit/rollout_workers/test_rollout_workers_updater.py): exactly the groups past
eta by the staleness rule (``staleness.gate``) are cancelled, each once.
"""

from __future__ import annotations

import asyncio

from staleness.gate import past_eta, staleness


class InFlight:
    """Group tasks -> their admission version, and which of them were cancelled as stale."""

    def __init__(self) -> None:
        self._groups: dict[asyncio.Task[None], int] = {}
        self._cancelled_stale: set[asyncio.Task[None]] = set()
        self.cancel_version = 0
        """The version of the last ``cancel_past_eta`` that cancelled a group."""

    def __len__(self) -> int:
        return len(self._groups)

    def add(self, task: asyncio.Task[None], admission_version: int) -> None:
        self._groups[task] = admission_version

    def done(self, task: asyncio.Task[None]) -> None:
        self._groups.pop(task, None)
        self._cancelled_stale.discard(task)

    def tasks(self) -> set[asyncio.Task[None]]:
        return set(self._groups)

    def cancelled_stale(self, task: asyncio.Task[None] | None) -> bool:
        """True if ``task`` was cancelled by ``cancel_past_eta``."""
        return task in self._cancelled_stale

    def cancel_past_eta(self, version: int, eta: int) -> int:
        """Cancel the groups that can no longer be trained once the weights are at
        ``version``; returns how many were cancelled now."""
        n = 0
        for t, v in list(self._groups.items()):
            stale = past_eta(staleness(version, (), admission_version=v), eta)
            if stale and t not in self._cancelled_stale and not t.done():
                self._cancelled_stale.add(t)
                t.cancel()
                self.cancel_version = version
                n += 1
        return n
