"""``staleness.auto_eta``: the rule on hand-made windows, and the controller driving a model of
the pipeline (the gate, a worker, the trainer's earliest-expiry pool with holds) whose
generation slows down mid-run and recovers: eta rises, then falls back, and no group is ever
trained past the eta it was judged at."""

from __future__ import annotations

import random

import pytest

from staleness.auto_eta import AutoEtaSettings, EtaController, StepSample
from staleness.gate import admission_capacity, plan_batch, staleness


def _steps(c: EtaController, n: int, **kw: float) -> list[tuple[int, int]]:
    """Feed ``n`` identical steps (running totals growing per step); the changes made."""
    out = []
    for _ in range(n):
        i = len(c._window) + c.windows * c.settings.window + 1
        tok = i * 100
        d = c.observe(
            StepSample(
                step=i,
                idle_s=kw.get("idle", 0.0),
                busy_s=1.0,
                hold_s=kw.get("hold", 0.0),
                generated_tokens=tok,
                wasted_tokens=int(tok * kw.get("waste", 0.0)),
                refused=int(i * kw.get("refused", 0)),
            )
        )
        if d is not None:
            out.append((d.old, d.new))
            assert d.why["rule"] and "idle_share" in d.why and "waste_share" in d.why
    return out


def test_rises_when_idle_is_eta_bound_and_not_otherwise() -> None:
    s = AutoEtaSettings(eta_max=3, window=4)
    c = EtaController(s, 1)
    # idle 10%, but the gate refused nobody and nothing was held: generation speed, not eta
    assert _steps(c, 9, idle=0.11) == []
    # the gate held workers back: up, one per window, never above eta_max
    assert _steps(c, 20, idle=0.11, refused=1) == [(1, 2), (2, 3)]
    assert c.eta == 3


def test_rises_on_waste_and_falls_back_when_quiet() -> None:
    s = AutoEtaSettings(eta_max=8, window=4, retry_after=2)
    c = EtaController(s, 2)
    assert _steps(c, 5, waste=0.05) == [(2, 3)]
    # quiet: 2 was found too small one window ago; it waits retry_after windows, then tries
    assert _steps(c, 4) == []
    assert _steps(c, 4) == [(3, 2)]
    assert _steps(c, 8) == [(2, 1), (1, 0)]


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="idle_target"):
        AutoEtaSettings(idle_target=0)
    with pytest.raises(ValueError, match="window"):
        AutoEtaSettings(window=0)


def _pipeline(slow: tuple[int, int], steps: int, seed: int) -> tuple[list[int], list[int], int]:
    """Ticks: a worker of 24 concurrent groups (durations ~ lognormal, x4 while ``slow[0] <=
    step < slow[1]``), a trainer of 4 groups per 3-tick step with the plan_batch pool and
    unbounded holds, eta from the controller. Returns (eta per step, staleness of every
    trained group minus the eta it was judged at, groups dropped)."""
    rng = random.Random(seed)
    b, conc, train = 4, 24, 3
    ctl = EtaController(AutoEtaSettings(eta_max=6, window=6, retry_after=3), 1)
    version = admitted = rejected = refused = dropped = 0
    inflight: list[tuple[int, int]] = []
    pool: list[int] = []
    etas: list[int] = []
    over: list[int] = []
    t = busy_until = 0
    idle = hold = 0
    gen = 0
    bound = gate = ctl.eta  # the trainer's bound and the gate's eta (apart while lowering)
    bound_from: int | None = None
    narrowed_at = 0
    while len(etas) < steps:
        t += 1
        assert t < 200_000, "the pipeline stalled"
        eta = bound
        factor = 4 if slow[0] <= len(etas) < slow[1] else 1
        cap = admission_capacity(version, gate, b, admitted, rejected)
        while len(inflight) < conc:
            if cap <= 0:
                refused += 1
                break
            inflight.append((t + max(1, int(factor * rng.lognormvariate(1.0, 0.6))), version))
            admitted += 1
            cap -= 1
        pool += [v for f, v in sorted(inflight) if f <= t]
        gen += sum(1 for f, _ in inflight if f <= t)
        inflight = [x for x in inflight if x[0] > t]
        if t < busy_until:
            continue
        by_v: dict[int, int] = {}
        for _, v in inflight:
            by_v[v] = by_v.get(v, 0) + 1
        narrowed = None if bound_from is None else (narrowed_at, gate)
        plan = plan_batch(pool, by_v, version=version, eta=eta, take=b, narrowed=narrowed)
        if not plan.ready:
            idle += 1
            hold += len(plan.take) == b
            continue
        dropped += len(plan.expired)
        rejected += len(plan.expired)
        over += [staleness(version, [pool[i]]) - eta for i in plan.take]
        gone = set(plan.take + plan.expired)
        pool = [v for i, v in enumerate(pool) if i not in gone]
        etas.append(eta)
        d = ctl.observe(
            StepSample(len(etas), float(idle), float(train), float(hold), gen, dropped, refused)
        )
        idle = hold = 0
        busy_until = t + train
        version += 1
        # as the trainer applies decisions (trainer.loop._tune_eta): up at once; down by
        # narrowing the gate first, the bound once the older groups are out of reach
        if bound_from is not None and version >= bound_from:
            bound, bound_from = gate, None
        if d is not None and d.new > bound:
            bound = gate = d.new
            bound_from = None
        elif d is not None and bound_from is not None:
            ctl.eta = gate  # one lowering at a time
        elif d is not None:
            gate, bound_from, narrowed_at = d.new, version + bound + 1, version
    return etas, over, dropped


def test_eta_rises_when_generation_slows_and_falls_back_when_it_recovers() -> None:
    for seed in range(3):
        etas, over, dropped = _pipeline(slow=(40, 110), steps=200, seed=seed)
        before, during, after = etas[30:40], etas[90:110], etas[180:]
        assert max(during) > max(before), (seed, etas)
        assert max(after) < max(during), (seed, etas)
        assert max(over) <= 0 and dropped == 0  # nothing trained past eta, nothing lost
