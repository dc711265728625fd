"""Prophet's early-commit test: top-2 logit gap, averaged over the monitored positions, against a threshold that falls
with decoding progress.

Li et al., "Diffusion Language Models Know the Answer Before Decoding", arXiv:2508.19982 (reference code:
``pixeli99/Prophet``, ``generate_earlyexit.py``).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # torch loads on first use: the option checks here serve ``fastgen --help``, which needs none
    import torch

DEFAULT_THRESHOLDS = (7.5, 5.0, 2.5)
# The reference implementation switches phases at progress 0.33 and 0.67 (progress = 1-based step / total steps).
DEFAULT_PHASE_BOUNDARIES = (0.33, 0.67)
# How progress is measured: within the active block, or over the whole generation (the reference code's choice).
PROGRESS_MODES = ("block", "global")


def validate_thresholds(thresholds: Sequence[float], name: str = "thresholds") -> tuple[float, float, float]:
    """Check (early, mid, late) gap thresholds: three numbers, no NaN, non-increasing (+-inf allowed)."""
    try:
        values = tuple(float(v) for v in thresholds)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be three numbers (early, mid, late), got {thresholds!r}.") from None
    if len(values) != 3:
        raise ValueError(f"{name} must be three numbers (early, mid, late), got {len(values)}: {thresholds!r}.")
    if any(math.isnan(v) for v in values):
        raise ValueError(f"{name} must not contain NaN, got {thresholds!r}.")
    if not values[0] >= values[1] >= values[2]:
        raise ValueError(
            f"{name} must be non-increasing (early >= mid >= late, e.g. 7.5 5.0 2.5; +inf/-inf allowed), "
            f"got {thresholds!r}."
        )
    return values


def validate_phase_boundaries(boundaries: Sequence[float], name: str = "phase_boundaries") -> tuple[float, float]:
    """Check the two progress values where the early and mid phases end: 0 <= first <= second <= 1."""
    try:
        values = tuple(float(v) for v in boundaries)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be two numbers in [0, 1], got {boundaries!r}.") from None
    if len(values) != 2 or not 0.0 <= values[0] <= values[1] <= 1.0:
        raise ValueError(f"{name} must be two increasing numbers in [0, 1] (e.g. 0.33 0.67), got {boundaries!r}.")
    return values


def phase_threshold(
    progress: float,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    boundaries: Sequence[float] = DEFAULT_PHASE_BOUNDARIES,
) -> float:
    """tau(progress): early threshold while progress < boundaries[0], mid while < boundaries[1], late after."""
    if progress < boundaries[0]:
        return float(thresholds[0])
    if progress < boundaries[1]:
        return float(thresholds[1])
    return float(thresholds[2])


def top2_gap(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 logit over the last axis (= the log-probability gap; the softmax normaliser cancels)."""
    import torch

    top = torch.topk(logits.float(), k=2, dim=-1).values
    return top[..., 0] - top[..., 1]


def mean_gap(logits: torch.Tensor, monitor: torch.Tensor) -> torch.Tensor:
    """Mean top-2 gap per row over the positions where ``monitor`` is True; NaN for rows with none (never fires).

    Args:
        logits: ``[batch, length, vocab]``.
        monitor: ``[batch, length]`` or ``[length]`` booleans.
    """
    import torch

    gap = top2_gap(logits)
    monitor = monitor.to(device=gap.device, dtype=torch.bool).expand_as(gap)
    count = monitor.sum(dim=-1)
    total = torch.where(monitor, gap, torch.zeros_like(gap)).sum(dim=-1)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))


def should_commit(gap: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per-row decision ``gap >= threshold`` (NaN, i.e. nothing monitored, is False)."""
    return gap >= threshold


def answer_start_from_constraints(constraints: dict[int, int]) -> int:
    """Reference rule: the answer starts 2 positions after the last forced anchor token (e.g. "... is" + space)."""
    return max(int(p) for p in constraints) + 2
