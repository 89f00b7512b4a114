"""GRPO group-normalised advantages as pure functions: per sample, and per model turn of
multi-turn episodes that score their turns."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch


def grpo_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor | Sequence[Hashable],
    normalize_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Per-sample advantages normalised within each group of samples of the same prompt.

    ``rewards`` is ``[N]`` float; ``group_ids`` ``[N]`` (ints in a tensor, or any hashables such
    as group-id strings) says which group each sample belongs to. With ``mean_g`` and ``std_g``
    the group's mean and population standard deviation (divide by n, so a group of one is
    defined)::

        A_i = (r_i - mean_g) / (std_g + eps)   if normalize_std
        A_i = r_i - mean_g                      otherwise

    Invariants: advantages sum to ~0 within every group; a group whose rewards are all equal
    (it carries no learning signal) gets exactly 0, with no rounding residue. Returns ``[N]``
    in the dtype of ``rewards``, without gradient.
    """
    if rewards.dim() != 1:
        raise ValueError(f"grpo_advantages: rewards must be [N]; got shape {tuple(rewards.shape)}")
    n = rewards.shape[0]
    if len(group_ids) != n:
        raise ValueError(f"grpo_advantages: {len(group_ids)} group ids for {n} rewards")
    if not eps > 0:
        raise ValueError(f"grpo_advantages: eps={eps} must be > 0")
    r = rewards.detach()
    if not r.is_floating_point():
        r = r.to(torch.float32)
    if n == 0:
        return r.clone()
    if isinstance(group_ids, torch.Tensor):
        _, inverse = torch.unique(group_ids, return_inverse=True)
        idx = inverse.to(device=r.device, dtype=torch.long)
    else:
        seen: dict[Hashable, int] = {}
        idx = torch.tensor([seen.setdefault(g, len(seen)) for g in group_ids], device=r.device)
    n_groups = int(idx.max().item()) + 1
    counts = torch.zeros(n_groups, dtype=r.dtype, device=r.device).index_add_(
        0, idx, torch.ones_like(r)
    )
    sums = torch.zeros_like(counts).index_add_(0, idx, r)
    mean = sums / counts
    centred = r - mean[idx]
    gmax = torch.full_like(counts, float("-inf")).scatter_reduce_(0, idx, r, reduce="amax")
    gmin = torch.full_like(counts, float("inf")).scatter_reduce_(0, idx, r, reduce="amin")
    constant = (gmax == gmin)[idx]
    if normalize_std:
        var = torch.zeros_like(counts).index_add_(0, idx, centred * centred) / counts
        centred = centred / (var.sqrt()[idx] + eps)
    return torch.where(constant, torch.zeros_like(centred), centred)


def turn_advantages(
    turn_rewards: Sequence[Sequence[float]],
    group_ids: Sequence[Hashable],
    normalize_std: bool = True,
    eps: float = 1e-6,
) -> list[list[float]]:
    """Per-turn advantages of episodes whose turns are scored separately.

    ``turn_rewards[i]`` holds the ``K_i`` turn rewards of episode ``i`` (an episode with one
    reward is ``[0, ..., 0, R]``: its reward at its last turn); ``group_ids[i]`` its group.
    Turn ``k`` of episode ``i`` is credited with its *return*, the rewards from that turn on
    (a turn's tokens cannot change the rewards before it)::

        G_ik = sum_{j >= k} r_ij
        A_ik = grpo_advantages over the episodes of the same group that have a turn k

    i.e. the baseline of turn ``k`` is the mean return from turn ``k`` of the group's episodes
    that reached it (and the spread their std when ``normalize_std``). With episode-level
    rewards and equal turn counts every turn gets the episode's ``grpo_advantages``; with turn
    rewards a turn's tokens no longer carry the noise of the turns before it. A turn index
    whose returns are all equal within the group gets exactly 0. Returns one list of ``K_i``
    floats per episode.
    """
    if len(turn_rewards) != len(group_ids):
        raise ValueError(
            f"turn_advantages: {len(group_ids)} group ids for {len(turn_rewards)} episodes"
        )
    returns: list[float] = []
    keys: list[tuple[Hashable, int]] = []
    for g, rs in zip(group_ids, turn_rewards, strict=True):
        acc = 0.0
        tail = []
        for r in reversed(rs):
            acc += float(r)
            tail.append(acc)
        for k, ret in enumerate(reversed(tail)):
            returns.append(ret)
            keys.append((g, k))
    if not returns:
        return [[] for _ in turn_rewards]
    flat = grpo_advantages(
        torch.tensor(returns, dtype=torch.float64), keys, normalize_std=normalize_std, eps=eps
    ).tolist()
    out: list[list[float]] = []
    at = 0
    for rs in turn_rewards:
        out.append(flat[at : at + len(rs)])
        at += len(rs)
    return out
