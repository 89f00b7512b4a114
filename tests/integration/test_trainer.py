"""Trainer unit and integration tests: batch assembly, advantages and loss by hand, micro-batch
equivalence, the loss falling on a fixed batch, staleness drops on real Redis."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from trainer_helpers import base_config, make_group, make_model, put_groups, read_metrics

from buffer import Sample, TrajectoryGroup, keys
from sluice.config import SluiceConfig
from trainer.batch import TrainSample, make_micro_batch, samples_from_groups, token_logprobs
from trainer.config import TrainerConfig
from trainer.step import train_step


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("m") / "model", seed=3)


def _load(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True, dtype=torch.float32)
    m.eval()
    return m


def _sample(
    prompt: list[int], out: list[int], adv: float = 0.0, behav: float = -3.0
) -> TrainSample:
    return TrainSample(
        group_id="g",
        prompt_ids=np.array(prompt, dtype=np.int64),
        output_ids=np.array(out, dtype=np.int64),
        behaviour_logp=np.full(len(out), behav, dtype=np.float32),
        token_versions=np.zeros(len(out), dtype=np.int64),
        advantage=adv,
        reward=0.0,
    )


@pytest.mark.timeout(60)
def test_batch_logprobs_match_direct_forward(model_dir: Path) -> None:
    """Padding, masks and the shift by one: the trainer's log-probs of each output token equal
    a direct, unpadded forward of that sample alone, at temperature 0.7."""
    model = _load(model_dir)
    samples = [_sample([5, 6, 7], [8, 9]), _sample([10], [11, 12, 13, 14]), _sample([4, 4], [3])]
    mb = make_micro_batch(samples)
    t = 0.7
    with torch.no_grad():
        got = token_logprobs(model, mb, t)
    assert mb.input_ids.shape == (3, 5)
    for r, s in enumerate(samples):
        p, n = len(s.prompt_ids), len(s.output_ids)
        expected_mask = torch.zeros(4)
        expected_mask[p - 1 : p - 1 + n] = 1
        assert torch.equal(mb.mask[r], expected_mask)
        seq = torch.tensor([[*s.prompt_ids, *s.output_ids]])
        with torch.no_grad():
            logits = model(input_ids=seq).logits[0].float()
        direct = torch.log_softmax(logits / t, -1)
        # logits at position p-1+i predict output token i
        want = torch.stack([direct[p - 1 + i, s.output_ids[i]] for i in range(n)])
        torch.testing.assert_close(got[r, p - 1 : p - 1 + n], want, rtol=0, atol=1e-5)
        assert torch.all(got[r][expected_mask == 0] == 0)


def test_grpo_advantages_by_hand() -> None:
    """Group [1, 0, 0, 1]: mean 0.5, population std 0.5 -> advantages ±1 (÷ (0.5 + 1e-6));
    group [0.2, 0.2]: constant -> 0."""
    out = np.ones(2, dtype=np.int32)

    def g(rewards: list[float]) -> TrajectoryGroup:
        return TrajectoryGroup(
            run_id="r",
            prompt_id="p",
            prompt_ids=np.array([3], dtype=np.int32),
            samples=[
                Sample(out * 4, np.zeros(2, np.float32), np.zeros(2, np.int32), r, "stop", i)
                for i, r in enumerate(rewards)
            ],
            worker_id="w",
            admission_version=0,
        )

    s = samples_from_groups([g([1, 0, 0, 1]), g([0.2, 0.2])])
    a = 0.5 / (0.5 + 1e-6)
    assert [x.advantage for x in s] == pytest.approx([a, -a, -a, a, 0.0, 0.0], abs=1e-9)
    s2 = samples_from_groups([g([1, 0, 0, 1])], normalize_std=False)
    assert [x.advantage for x in s2] == pytest.approx([0.5, -0.5, -0.5, 0.5])


@pytest.mark.timeout(60)
def test_step_loss_matches_hand_computed(model_dir: Path) -> None:
    """At θ == p the ratio is 1, so per token the loss is -w * A with w = min(exp(p - b), C).
    With b = p - log(1.5) (w = 1.5) on every token and token_mean aggregation:
    loss = -1.5 * sum_i A_i T_i / sum_i T_i."""
    model = _load(model_dir)
    samples = [_sample([5, 6], [7, 8, 9], adv=1.0), _sample([3], [4], adv=-0.5)]
    mb = make_micro_batch(samples)
    with torch.no_grad():
        p = token_logprobs(model, mb)
    shifted = []
    for r, s in enumerate(samples):
        n0 = len(s.prompt_ids) - 1
        b = (p[r, n0 : n0 + len(s.output_ids)] - math.log(1.5)).numpy()
        shifted.append(TrainSample(**{**s.__dict__, "behaviour_logp": b.astype(np.float32)}))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    st = train_step(
        model,
        opt,
        None,
        shifted,
        TrainerConfig(is_mode="truncate", is_cap=2.0),
        temperature=1.0,
        device=torch.device("cpu"),
        current_version=0,
    )
    want = -1.5 * (1.0 * 3 + -0.5 * 1) / 4
    assert st.loss == pytest.approx(want, abs=1e-5)
    assert st.metrics["w_mean"] == pytest.approx(1.5, abs=1e-5)
    assert st.metrics["clip_frac"] == 0.0
    assert st.tokens == 4
    # The gap metric: current-version tokens differ from "rollout" by exactly log(1.5).
    assert st.metrics["logp_abs_diff"] == pytest.approx(math.log(1.5), abs=1e-5)
    assert st.metrics["logp_k3_kl"] == pytest.approx(1.5 - 1 - math.log(1.5), abs=1e-5)


@pytest.mark.timeout(60)
def test_micro_batches_give_the_same_update(model_dir: Path) -> None:
    """One micro-batch or one per sample: the same gradient, so the same SGD step (up to float
    rounding; SGD, not Adam, whose normalisation blows up rounding on near-zero gradients)."""
    rng = np.random.default_rng(0)
    samples = samples_from_groups([make_group(rng, "r") for _ in range(3)])
    results = []
    for budget in (10_000, 1):
        model = _load(model_dir)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        train_step(
            model,
            opt,
            None,
            samples,
            TrainerConfig(micro_batch_tokens=budget, is_mode="none"),
            temperature=1.0,
            device=torch.device("cpu"),
            current_version=None,
        )
        results.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    before = _load(model_dir).state_dict()
    moved = 0.0
    for k in results[0]:
        d0, d1 = results[0][k] - before[k], results[1][k] - before[k]
        torch.testing.assert_close(d0, d1, rtol=1e-4, atol=1e-5)
        moved = max(moved, float(d0.abs().max()))
    assert moved > 1e-2  # the step did move the weights


@pytest.mark.timeout(60)
def test_loss_falls_on_a_fixed_batch(model_dir: Path) -> None:
    """Repeated steps on one batch with the proximal policy fixed at the starting one
    (prox_logp=behaviour, behaviour = the start policy): the clipped surrogate loss falls and
    the advantage-weighted log-likelihood rises."""
    model = _load(model_dir)
    rng = np.random.default_rng(1)
    samples = samples_from_groups([make_group(rng, "r", n=4) for _ in range(2)])
    mb = make_micro_batch(samples)
    with torch.no_grad():
        p0 = token_logprobs(model, mb)
    fixed = []
    for r, s in enumerate(samples):
        n0 = len(s.prompt_ids) - 1
        b = p0[r, n0 : n0 + len(s.output_ids)].numpy().astype(np.float32)
        fixed.append(TrainSample(**{**s.__dict__, "behaviour_logp": b}))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    settings = TrainerConfig(prox_logp="behaviour", is_mode="none", eps_low=0.2, eps_high=0.28)

    def objective() -> float:
        with torch.no_grad():
            lp = token_logprobs(model, mb)
        return float(((lp * mb.mask).sum(-1) * mb.advantages).sum())

    j0 = objective()
    losses = [
        train_step(
            model,
            opt,
            None,
            fixed,
            settings,
            temperature=1.0,
            device=torch.device("cpu"),
            current_version=None,
        ).loss
        for _ in range(8)
    ]
    assert losses[0] == pytest.approx(
        -float((mb.advantages * mb.mask.sum(-1)).sum()) / float(mb.mask.sum()), abs=1e-5
    )
    assert losses[-1] < losses[0] - 0.05, losses
    assert objective() > j0 + 0.5


async def _admit_finished(url: str, run: str, n: int) -> None:
    from staleness import VersionManager

    vm = await VersionManager.open(url, run, eta=1, batch_groups=4)
    try:
        assert await vm.try_admit("w", n) == n
        await vm.finish("w", n)
        await vm.publish_weights(3, "/nonexistent/v3")
    finally:
        await vm.close()


@pytest.mark.timeout(90)
def test_stale_groups_are_dropped_counted_and_never_trained(
    redis_url: str, run_name: str, tmp_path: Path, model_dir: Path
) -> None:
    """Trainer at version 3, eta 1: groups whose oldest token is v3 or v2 train; v1 and v0 are
    dropped (counted in metrics and in the gate's rejected_by['stale']), acked, and absent
    from the checkpoint's trained groups; the step's staleness_max_trained is that of the
    groups trained, not of those read. The step trains a full batch: two more v3 groups."""
    from sluice.commands.train import run_trainer
    from staleness import VersionManager

    asyncio.run(_admit_finished(redis_url, run_name, 6))
    rng = np.random.default_rng(2)
    groups = [make_group(rng, run_name, version=v, group_id=f"v{v}") for v in (3, 1, 2, 0)]
    groups += [make_group(rng, run_name, version=3, group_id=f"v3{x}") for x in "bc"]
    put_groups(redis_url, run_name, groups)
    conf = base_config(tmp_path, redis_url, run_name, model_dir, max_steps=1)
    conf["staleness"] = {"eta": 1, "batch_groups": 4}
    cfg = SluiceConfig.model_validate(conf)
    assert asyncio.run(run_trainer(cfg)) == 1

    (m,) = read_metrics(tmp_path / run_name)
    assert m["dropped"] == 2 and m["dropped_total"] == 2 and m["groups"] == 6
    assert m["staleness_hist"] == {"0": 3, "1": 1, "2": 1, "3": 1}
    assert (m["dropped_stale"], m["dropped_future"]) == (2, 0)
    assert sorted(m["dropped_group_ids"]) == ["v0", "v1"]
    # Trained staleness comes from the groups that reached the optimizer, derived from their
    # token versions: the kept groups v3 and v2 at version 3 are 0 and 1 versions old -> 1;
    # the arrival maximum (3) counts the dropped v0.
    assert sorted(m["group_ids"]) == ["v2", "v3", "v3b", "v3c"]
    trained = [g for g in groups if g.group_id in m["group_ids"]]
    assert m["staleness_max_trained"] == max(3 - g.min_version() for g in trained) == 1
    assert m["staleness_max"] == 3
    assert m["samples"] == 16  # 4 kept groups x 4 samples
    assert m["staleness_hist_trained"] == {"0": 3, "1": 1}
    assert m["version"] == 4
    # buffer_s: the step's Redis calls (record, eta, 2 drops + acks, publish, reap), in step_s.
    assert 0 < m["buffer_s"] <= m["step_s"]

    async def check() -> None:
        import json

        from buffer import RedisTrajectoryBuffer, connect

        r = await connect(redis_url)
        try:
            vm = await VersionManager.from_client(r, run_name)
            snap = await vm.snapshot()
            assert snap.rejected_by == {"stale": 2}
            stats = await RedisTrajectoryBuffer(r, run_name, "probe").stats()
            assert (stats.length, stats.pending) == (0, 0)
            ptr = await r.hgetall(keys.trainer_checkpoint(run_name, "trainer-0"))
            state = json.loads((Path(ptr[b"path"].decode()) / "state.json").read_text())
            assert sorted(state["groups"]) == ["v2", "v3", "v3b", "v3c"]
        finally:
            await r.aclose()

    asyncio.run(check())
    # The published weights are a loadable HF model dir.
    pub = tmp_path / run_name / "weights" / "v4"
    assert {"config.json", "model.safetensors"} <= {p.name for p in pub.iterdir()}
    _load(pub)


def test_empty_model_path_is_a_clear_error(tmp_path: Path) -> None:
    """Refused before anything connects (no Redis runs here)."""
    from sluice.commands.train import run_trainer
    from trainer.loop import TrainerError

    cfg = SluiceConfig.model_validate({"run": {"dir": str(tmp_path)}})
    with pytest.raises(TrainerError, match=r"model\.path is empty"):
        asyncio.run(run_trainer(cfg))
