"""``staleness.eta: auto``: the smallest eta that keeps the trainer fed and the waste low,
picked from what the run measures, and changed live (as ``sluice run set-eta`` does).

The decision is a pure function of measurements (``EtaController.observe``); the trainer's
rank 0 feeds it one ``StepSample`` per step and applies a decision with
``VersionManager.set_eta(eta, why=...)``, which logs it with its measurements in the run's
eta changes (``sluice status`` shows them).

Per window of ``window`` steps after the last decision, with

- *idle share*: seconds the trainer waited for data over its wall time (waiting + stepping);
- *eta-bound idle*: whether that wait is one eta can shorten: the trainer held for groups that
  would otherwise expire (``hold_s``), or the gate refused a worker room
  (``Waste.refused`` grew): the workers could have generated more had eta let them. An idle
  trainer whose workers all run at their own concurrency limit waits for generation speed,
  which no eta changes, and eta is not raised for it;
- *waste share*: tokens thrown away (cancelled, dropped) over tokens generated in the window,

the rule is:

- **up** by one (to at most ``eta_max``) when the idle share is over ``idle_target`` and
  eta-bound, or the waste share is over ``waste_target``; the eta it leaves is remembered as
  too small;
- **down** by one (to at least 0) when the idle share is under half its target and the waste
  share under half its target, unless the eta below was found too small in the last
  ``retry_after`` windows (no flapping between two values while the load is steady; once the
  load changes, e.g. generation speeds up again, the lower eta is tried again and kept if it
  holds).

Tested in tests/unit/staleness/test_auto_eta.py, on hand-made windows and on the pipeline
model of tests/unit/staleness/test_plan_batch.py with a generation speed that drops mid-run and
recovers: eta rises, then falls back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class AutoEtaSettings:
    """What ``staleness.eta: auto`` aims at (the ``staleness`` section's ``eta_max``,
    ``idle_target``, ``waste_target``, ``auto_window``, ``auto_retry_after``)."""

    eta_max: int = 8
    idle_target: float = 0.02
    waste_target: float = 0.01
    window: int = 8
    retry_after: int = 6

    def __post_init__(self) -> None:
        if self.eta_max < 0 or self.window < 1 or self.retry_after < 0:
            raise ValueError(
                f"auto eta: eta_max={self.eta_max} must be >= 0, window={self.window} >= 1, "
                f"retry_after={self.retry_after} >= 0"
            )
        if not (0 < self.idle_target < 1 and 0 < self.waste_target < 1):
            raise ValueError(
                f"auto eta: idle_target={self.idle_target} and waste_target="
                f"{self.waste_target} must be in (0, 1)"
            )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StepSample:
    """One trainer step's measurements (``generated_tokens``, ``wasted_tokens`` and
    ``refused`` are the run's running totals after the step)."""

    step: int
    idle_s: float
    """Seconds the step waited for its groups."""
    busy_s: float
    """Seconds the step itself took (train, publish, books)."""
    hold_s: float = 0.0
    """Of ``idle_s``, seconds it held with a full batch for groups that would expire."""
    generated_tokens: int = 0
    wasted_tokens: int = 0
    refused: int = 0


@dataclass(frozen=True)
class EtaDecision:
    """A change of eta and the measurements behind it (logged with it)."""

    old: int
    new: int
    why: dict[str, Any]


@dataclass
class EtaController:
    """Decides eta from one window of steps at a time (see the module docstring)."""

    settings: AutoEtaSettings
    eta: int
    windows: int = 0
    too_small: dict[int, int] = field(default_factory=dict)
    """eta -> the window in which it was found too small."""
    _window: list[StepSample] = field(default_factory=list)
    _base: StepSample | None = None
    """The sample before the window (its running totals are the window's baseline)."""

    def __post_init__(self) -> None:
        self.eta = min(max(self.eta, 0), self.settings.eta_max)

    def observe(self, sample: StepSample) -> EtaDecision | None:
        """Add one step; at the end of a window, the decision (None: eta stays)."""
        if self._base is None:  # the first step only sets the baseline of the totals
            self._base = sample
            return None
        self._window.append(sample)
        if len(self._window) < self.settings.window:
            return None
        window, base = self._window, self._base
        self._window, self._base = [], sample
        self.windows += 1
        m = measure(window, base)
        s = self.settings
        old = self.eta
        rule = None
        if m["waste_share"] > s.waste_target:
            rule = "up: waste over target"
        elif m["idle_share"] > s.idle_target and m["eta_bound"]:
            rule = "up: trainer idle over target, held back by eta"
        if rule is not None:
            self.too_small[old] = self.windows
            if old >= s.eta_max:
                return None
            self.eta = old + 1
        elif (
            old > 0
            and m["idle_share"] <= s.idle_target / 2
            and m["waste_share"] <= s.waste_target / 2
        ):
            failed = self.too_small.get(old - 1)
            if failed is not None and self.windows - failed < s.retry_after:
                return None
            rule = "down: idle and waste under half their targets"
            self.eta = old - 1
        else:
            return None
        why = {
            "rule": rule,
            "trainer_step": sample.step,
            **m,
            "idle_target": s.idle_target,
            "waste_target": s.waste_target,
            "eta_max": s.eta_max,
        }
        return EtaDecision(old, self.eta, why)


def measure(window: list[StepSample], base: StepSample) -> dict[str, Any]:
    """A window's idle share, hold share, waste share, gate refusals and whether its idle is
    eta-bound (``EtaController``)."""
    idle = sum(x.idle_s for x in window)
    busy = sum(x.busy_s for x in window)
    hold = sum(x.hold_s for x in window)
    last = window[-1]
    gen = last.generated_tokens - base.generated_tokens
    wasted = last.wasted_tokens - base.wasted_tokens
    refused = last.refused - base.refused
    wall = idle + busy
    return {
        "steps": len(window),
        "idle_share": round(idle / wall, 4) if wall > 0 else 0.0,
        "hold_share": round(hold / wall, 4) if wall > 0 else 0.0,
        "waste_share": round(wasted / gen, 4) if gen > 0 else 0.0,
        "generated_tokens": gen,
        "wasted_tokens": wasted,
        "gate_refusals": refused,
        "eta_bound": hold > 0 or refused > 0,
    }
