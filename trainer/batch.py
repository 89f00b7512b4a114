"""Batch assembly: trajectory groups -> padded token tensors, micro-batches and log-probs.

Frame. A sample is the sequence ``s = prompt_ids + output_ids`` of length ``L = P + T``. The
model reads ``s`` and its logits at position ``j`` predict token ``s[j + 1]``, so every tensor
the loss sees lives in the *shifted* frame of length ``L_max - 1`` (``L_max`` the longest
sequence of the micro-batch, right-padded): position ``j`` holds the log-prob of ``s[j + 1]``.
Output token ``i`` (0-based) of a sample sits at ``j = P - 1 + i``.

Invariants (``tests/integration/test_trainer.py::test_batch_logprobs_match_direct_forward``):
- ``mask[b, j] == 1`` exactly on the output tokens of row ``b`` that the policy sampled (the
  sample's ``loss_mask``); prompt tokens, tokens an episode's environment appended and padding
  are 0, so nothing but sampled tokens is trained on: an appended token gets exactly zero
  gradient (``tests/unit/trainer/test_trainer_episode_mask.py``) while it is still read as
  context by the tokens after it.
- ``behav_logp`` and ``versions`` are the sample's per-output-token arrays placed at the same
  positions; padding holds 0 (behav) and -1 (versions), never read under the mask.
- ``token_logprobs`` returns ``log_softmax(logits / T)`` of the target token in this frame,
  computed in float32 whatever the autocast dtype, the same quantity the inference server
  reports as the behaviour log-prob at sampling temperature ``T``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from buffer.schema import TrajectoryGroup


@dataclass(frozen=True)
class TrainSample:
    """One sample ready for the trainer."""

    group_id: str
    prompt_ids: np.ndarray
    """int32[P], P >= 1."""
    output_ids: np.ndarray
    """int32[T], T >= 1."""
    behaviour_logp: np.ndarray
    """float32[T]."""
    token_versions: np.ndarray
    """int32[T]."""
    advantage: float
    reward: float
    loss_mask: np.ndarray | None = None
    """float32[T]: 1 on sampled tokens, 0 on appended ones (None = all sampled)."""
    turns: int = 1
    """Model turns of the episode (``Sample.num_turns``)."""
    token_advantages: np.ndarray | None = None
    """float32[T]: per-token advantages when the episode's group scored its turns (each model
    turn's tokens get that turn's advantage, ``staleness.turn_advantages``); None = every
    token gets ``advantage``."""

    @property
    def length(self) -> int:
        return int(self.prompt_ids.shape[0] + self.output_ids.shape[0])


def samples_from_groups(
    groups: Sequence[TrajectoryGroup], *, normalize_std: bool = True
) -> list[TrainSample]:
    """Flatten groups into samples with GRPO group-normalised advantages.

    Advantages use every sample of the group (``staleness.grpo_advantages``); samples without
    output tokens carry no loss and are then left out. A group in which an episode scored its
    turns (``Sample.turn_rewards``) gets per-turn advantages instead
    (``staleness.turn_advantages``; its other samples count their reward at their last turn):
    ``token_advantages`` then holds each token's, and ``advantage`` that of the first turn.
    Raises ``ValueError`` on a group with an empty prompt (the first output token would have
    no context to be predicted from).
    """
    from staleness import grpo_advantages

    rewards: list[float] = []
    gids: list[str] = []
    flat = []
    for g in groups:
        if g.prompt_ids.shape[0] == 0:
            raise ValueError(f"group {g.group_id}: empty prompt_ids")
        for s in g.samples:
            rewards.append(float(s.reward))
            gids.append(g.group_id)
            flat.append((g, s))
    if not flat:
        return []
    adv = grpo_advantages(
        torch.tensor(rewards, dtype=torch.float64), gids, normalize_std=normalize_std
    )
    per_turn = _per_turn_advantages(groups, normalize_std)
    out = []
    for (g, s), a in zip(flat, adv.tolist(), strict=True):
        if s.num_tokens == 0:
            continue
        tok_adv = None
        if g.group_id in per_turn:
            turn_adv = per_turn[g.group_id][s.index]
            tok_adv = _spread_over_turns(turn_adv, s.turn_starts, s.num_tokens)
            a = turn_adv[0] if turn_adv else 0.0
        out.append(
            TrainSample(
                group_id=g.group_id,
                prompt_ids=np.array(g.prompt_ids, dtype=np.int64),
                output_ids=np.array(s.output_ids, dtype=np.int64),
                behaviour_logp=np.array(s.behaviour_logp, dtype=np.float32),
                token_versions=np.array(s.token_versions, dtype=np.int64),
                advantage=float(a),
                reward=float(s.reward),
                loss_mask=np.array(s.loss_mask, dtype=np.float32),
                turns=s.num_turns,
                token_advantages=tok_adv,
            )
        )
    return out


def _per_turn_advantages(
    groups: Sequence[TrajectoryGroup], normalize_std: bool
) -> dict[str, dict[int, list[float]]]:
    """For the groups with scored turns: group id -> sample index -> per-turn advantages."""
    from staleness import turn_advantages

    scored = [g for g in groups if any(s.turn_rewards is not None for s in g.samples)]
    rewards: list[list[float]] = []
    keys: list[tuple[str, int]] = []
    for g in scored:
        for s in g.samples:
            if s.turn_rewards is not None:
                rewards.append([float(x) for x in s.turn_rewards])
            else:  # one reward: at the episode's last turn
                rewards.append([0.0] * (s.num_turns - 1) + [float(s.reward)] if s.num_turns else [])
            keys.append((g.group_id, s.index))
    gids = [gid for gid, _ in keys]
    out: dict[str, dict[int, list[float]]] = {}
    for (gid, i), a in zip(
        keys, turn_advantages(rewards, gids, normalize_std=normalize_std), strict=True
    ):
        out.setdefault(gid, {})[i] = a
    return out


def _spread_over_turns(turn_adv: list[float], starts: Any, length: int) -> np.ndarray:
    """float32[length]: turn ``k``'s advantage on the tokens from its start to the next
    turn's (the environment's tokens in between are masked out of the loss anyway); 0 before
    the first turn."""
    out = np.zeros(length, dtype=np.float32)
    bounds = [int(x) for x in starts] + [length]
    for k, a in enumerate(turn_adv):
        out[bounds[k] : bounds[k + 1]] = a
    return out


@dataclass
class MicroBatch:
    """Padded tensors of a few samples (shapes: B rows, L = longest sequence)."""

    input_ids: torch.Tensor
    """long[B, L], right-padded with ``pad_id``."""
    attention_mask: torch.Tensor
    """long[B, L]: 1 on real tokens."""
    mask: torch.Tensor
    """float32[B, L-1]: 1 on sampled output tokens (shifted frame), 0 on appended ones."""
    behav_logp: torch.Tensor
    """float32[B, L-1]."""
    versions: torch.Tensor
    """long[B, L-1]: version of each output token, -1 elsewhere."""
    advantages: torch.Tensor
    """float32[B] (one per sample), or float32[B, L-1] in the shifted frame when a sample has
    per-token advantages (episodes that scored their turns)."""
    rewards: torch.Tensor
    """float32[B]."""

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def padded_tokens(self) -> int:
        return int(self.input_ids.numel())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MicroBatch:
        return MicroBatch(
            **{
                k: v.to(device, non_blocking=non_blocking)
                for k, v in self.__dict__.items()
                if isinstance(v, torch.Tensor)
            }
        )


def make_micro_batch(samples: Sequence[TrainSample], pad_id: int = 0) -> MicroBatch:
    """Right-pad ``samples`` into one ``MicroBatch`` (frame in the module docstring)."""
    if not samples:
        raise ValueError("make_micro_batch: no samples")
    b = len(samples)
    width = max(s.length for s in samples)
    if width < 2:
        raise ValueError("make_micro_batch: every sequence needs >= 2 tokens")
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    att = torch.zeros((b, width), dtype=torch.long)
    mask = torch.zeros((b, width - 1), dtype=torch.float32)
    behav = torch.zeros((b, width - 1), dtype=torch.float32)
    vers = torch.full((b, width - 1), -1, dtype=torch.long)
    for r, s in enumerate(samples):
        p, t = int(s.prompt_ids.shape[0]), int(s.output_ids.shape[0])
        ids[r, :p] = torch.from_numpy(s.prompt_ids)
        ids[r, p : p + t] = torch.from_numpy(s.output_ids)
        att[r, : p + t] = 1
        mask[r, p - 1 : p - 1 + t] = 1.0 if s.loss_mask is None else torch.from_numpy(s.loss_mask)
        behav[r, p - 1 : p - 1 + t] = torch.from_numpy(s.behaviour_logp)
        vers[r, p - 1 : p - 1 + t] = torch.from_numpy(s.token_versions)
    adv = torch.tensor([s.advantage for s in samples], dtype=torch.float32)
    if any(s.token_advantages is not None for s in samples):
        per_token = adv[:, None].expand(b, width - 1).clone()
        for r, s in enumerate(samples):
            if s.token_advantages is not None:
                p, t = int(s.prompt_ids.shape[0]), int(s.output_ids.shape[0])
                per_token[r, p - 1 : p - 1 + t] = torch.from_numpy(s.token_advantages)
        adv = per_token
    return MicroBatch(
        input_ids=ids,
        attention_mask=att,
        mask=mask,
        behav_logp=behav,
        versions=vers,
        advantages=adv,
        rewards=torch.tensor([s.reward for s in samples], dtype=torch.float32),
    )


def pack_micro_batches(
    samples: Sequence[TrainSample], token_budget: int, pad_id: int = 0
) -> list[MicroBatch]:
    """Greedy, order-preserving packing: a micro-batch grows while ``rows * longest`` (its
    padded token count) stays within ``token_budget``; a sample longer than the budget gets a
    micro-batch of its own. Every sample lands in exactly one micro-batch."""
    if token_budget < 1:
        raise ValueError(f"token_budget={token_budget} must be >= 1")
    out: list[MicroBatch] = []
    cur: list[TrainSample] = []
    longest = 0
    for s in samples:
        new_longest = max(longest, s.length)
        if cur and (len(cur) + 1) * new_longest > token_budget:
            out.append(make_micro_batch(cur, pad_id))
            cur, new_longest = [], s.length
        cur.append(s)
        longest = new_longest
    if cur:
        out.append(make_micro_batch(cur, pad_id))
    return out


def _log_softmax(model: Any, mb: MicroBatch, temperature: float) -> torch.Tensor:
    """float32[B, L, V]: ``log_softmax(logits / T)`` at every position of ``mb``."""
    t = float(temperature) if temperature > 0 else 1.0
    out = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False)
    # Over the whole [B, L, V] logits (the last position's row is computed and not read): a
    # slice before the softmax would copy the largest tensor of the step. At T = 1 the softmax
    # upcasts bf16 logits to float32 inside its kernel (dtype=), not through a float32 copy of
    # them; the result is the same float32 math.
    if t != 1.0:
        return torch.log_softmax(out.logits.float() / t, dim=-1)
    return torch.log_softmax(out.logits, dim=-1, dtype=torch.float32)


def _picked(logp: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
    picked = logp[:, :-1].gather(-1, mb.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return torch.where(mb.mask > 0, picked, torch.zeros_like(picked))


def token_logprobs(model: Any, mb: MicroBatch, temperature: float = 1.0) -> torch.Tensor:
    """float32[B, L-1]: ``log_softmax(logits / T)`` of each next token (0 where masked out).

    ``temperature <= 0`` (greedy sampling) is treated as 1, as the inference servers do.
    """
    return _picked(_log_softmax(model, mb, temperature), mb)


def token_logprobs_entropy(
    model: Any, mb: MicroBatch, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_logprobs`` and, from the same forward, float32[B, L-1] the entropy of the
    temperature-scaled next-token distribution at each position (0 where masked out), both
    differentiable (the entropy bonus, ``LossConfig.entropy_coef``). Costs one more [B, L, V]
    tensor than ``token_logprobs``."""
    logp = _log_softmax(model, mb, temperature)
    ent = -(logp[:, :-1].exp() * logp[:, :-1]).sum(-1)
    return _picked(logp, mb), torch.where(mb.mask > 0, ent, torch.zeros_like(ent))
