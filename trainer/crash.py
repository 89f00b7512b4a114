"""Fault injection for tests: ``SLUICE_TRAINER_CRASH_AT=<point>:<step>`` makes the trainer
SIGKILL itself at ``point`` of step ``step``.

Points: ``mid_step`` (after the first backward), ``after_step``, ``mid_publish`` (the weight
directory written, not renamed), ``after_publish``, ``mid_checkpoint``, ``before_commit`` (the
checkpoint durable, the Redis commit not done). ``tests/integration/test_trainer_crash.py`` kills at each and
checks the resumed run trains every group exactly once. For fault tests only.
"""

from __future__ import annotations

import logging
import os
import signal

from trainer.config import TrainerError

log = logging.getLogger("sluice.trainer")

CRASH_ENV = "SLUICE_TRAINER_CRASH_AT"
CRASH_POINTS = (
    "mid_step",
    "after_step",
    "mid_publish",
    "after_publish",
    "mid_checkpoint",
    "before_commit",
)


def parse_crash_at(text: str | None) -> tuple[str, int] | None:
    """``(point, step)`` of ``SLUICE_TRAINER_CRASH_AT``'s value, None when unset."""
    if not text:
        return None
    point, _, step = text.partition(":")
    if point not in CRASH_POINTS or not step.isdigit():
        raise TrainerError(
            f"{CRASH_ENV}={text!r}: expected <point>:<step> with point in {', '.join(CRASH_POINTS)}"
        )
    return point, int(step)


def crash_if(crash_at: tuple[str, int] | None, point: str, step: int) -> None:
    """SIGKILL this process if ``crash_at`` names ``point`` of ``step``."""
    if crash_at is not None and crash_at == (point, step):
        log.warning("test hook %s: SIGKILL at %s of step %d", CRASH_ENV, point, step)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
