"""f-divergence weights for f-distill: h(r) = f''(r) r^2 from a discriminator's density ratio.

Xu, Nie, Vahdat, *One-step Diffusion Models with f-Divergence Distribution Matching*, arXiv:2502.15681.
The gradient of ``D_f(p_t || q_t)`` with respect to the student is DMD's score difference weighted per
sample by ``h(r(x_t))`` with ``r = p_t / q_t`` (teacher over student marginal):

    grad D_f = E[ h(r) (grad log q_t - grad log p_t)^T d x_t / d theta ],   h(r) = f''(r) r^2 >= 0.

``r`` comes from the GAN discriminator (at its optimum the logit is ``log p_t / q_t``): clamp the logit,
exponentiate, detach, clip to ``[ratio_lower, ratio_upper]``; divide by its per-time-bin mean (an
optional EMA over steps), compute ``h`` and divide by the batch mean of ``h``
(the paper's two-stage normalisation). Means are all-reduced over processes as sums and counts.

Reverse KL (``"rkl"``) is the identity weight ``h == 1`` *without* any normalisation, so f-distill
with ``rkl`` is DMD2 exactly (spec correction 0.1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

DIVERGENCES = ("rkl", "kl", "js", "sh", "jf", "sf", "neyman")

# h(r) up to a constant factor, in the form used before normalisation (spec table 2.2, "form used").
_H = {
    "rkl": lambda r: torch.ones_like(r),              # reverse KL, f = -log r: h = 1 (DMD)
    "sf": lambda r: 1.0 / (1.0 + r),                  # softened RKL, f = (r+1) log((1+r)/(2r))
    "js": lambda r: 1.0 - 1.0 / (1.0 + r),            # Jensen-Shannon: h = r/(1+r), bounded (0, 1)
    "sh": lambda r: torch.sqrt(r),                    # squared Hellinger, f = (sqrt r - 1)^2: h = sqrt(r)/2
    "kl": lambda r: r,                                # forward KL, f = r log r: h = r
    "jf": lambda r: 1.0 + r,                          # Jeffreys, f = (r-1) log r: h = 1 + r
    "neyman": lambda r: 1.0 / torch.clamp(r, min=1e-8),  # Neyman chi^2, f = (1-r)^2/r: h = 2/r
}

# The convex generators f (f(1) = 0), for tests and for reading the table.
_F = {
    "rkl": lambda r: -torch.log(r),
    "sf": lambda r: (r + 1.0) * torch.log((1.0 + r) / (2.0 * r)),
    "js": lambda r: r * torch.log(r) - (1.0 + r) * torch.log((1.0 + r) / 2.0),
    "sh": lambda r: (torch.sqrt(r) - 1.0) ** 2,
    "kl": lambda r: r * torch.log(r),
    "jf": lambda r: (r - 1.0) * torch.log(r),
    "neyman": lambda r: (1.0 - r) ** 2 / r,
}

# h(1) of the pre-normalisation forms above (spec table, "used at r=1").
H_AT_ONE = {"rkl": 1.0, "sf": 0.5, "js": 0.5, "sh": 1.0, "kl": 1.0, "jf": 2.0, "neyman": 1.0}

# Scale between f''(r) r^2 and the form used (h_used = c * f'' r^2); only matters for tests.
H_SCALE = {"rkl": 1.0, "sf": 1.0, "js": 1.0, "sh": 2.0, "kl": 1.0, "jf": 1.0, "neyman": 0.5}


def check_divergence(divergence: str) -> str:
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}.")
    return divergence


def f_generator(divergence: str, r: torch.Tensor) -> torch.Tensor:
    """The convex function ``f`` of ``D_f(p || q) = E_q f(p/q)`` for ``divergence``."""
    return _F[check_divergence(divergence)](r)


def h_weight(divergence: str, r: torch.Tensor) -> torch.Tensor:
    """The un-normalised weight ``h(r)`` (spec table 2.2, "form used"), in ``r``'s dtype."""
    return _H[check_divergence(divergence)](r)


def density_ratio(logits: torch.Tensor, *, logit_clamp: float = 10.0, ratio_lower: float = 0.1,
                  ratio_upper: float = 20.0) -> torch.Tensor:
    """``r = clip(exp(clamp(logit)), lower, upper)``, detached, in float32 (spec 2.3 steps 2-3)."""
    logits = logits.detach().float()
    return torch.exp(logits.clamp(-logit_clamp, logit_clamp)).clamp(ratio_lower, ratio_upper)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over processes when ``torch.distributed`` is initialised (identity otherwise)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        x = x.clone()
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.SUM)
    return x


@dataclass
class RatioConfig:
    """f-distill's ratio and weight options (defaults: NVlabs/FastGen's, spec 2.3-2.4).

    Args:
        divergence: one of :data:`DIVERGENCES`.
        logit_clamp: logits are clamped to ``[-logit_clamp, logit_clamp]`` before ``exp``.
        ratio_lower, ratio_upper: clip range of ``r``.
        ratio_normalization: divide ``r`` by its mean in its time bin.
        num_bins: equal-width bins over ``[bin_t_min, bin_t_max]``.
        bin_t_min, bin_t_max: the time range binned (f-distill: the DM time range; standalone default [0, 1000)).
        ratio_ema_rate: per-bin EMA of the bin means (0: batch statistics only; 0.5 on ImageNet-64).
        h_eps: added to the batch mean of ``h`` before dividing.
    """

    divergence: str = "js"
    logit_clamp: float = 10.0
    ratio_lower: float = 0.1
    ratio_upper: float = 20.0
    ratio_normalization: bool = True
    num_bins: int = 10
    bin_t_min: float | None = None
    bin_t_max: float | None = None
    ratio_ema_rate: float = 0.0
    h_eps: float = 1e-6

    def __post_init__(self):
        check_divergence(self.divergence)
        if not 0.0 < self.ratio_lower < self.ratio_upper:
            raise ValueError(f"ratio_lower/ratio_upper must satisfy 0 < lower < upper, got "
                             f"{self.ratio_lower!r}, {self.ratio_upper!r}.")
        if isinstance(self.num_bins, bool) or not isinstance(self.num_bins, int) or self.num_bins < 1:
            raise ValueError(f"num_bins must be a positive integer, got {self.num_bins!r}.")
        if self.bin_t_min is not None and self.bin_t_max is not None and not self.bin_t_max > self.bin_t_min:
            raise ValueError(f"bin_t_max must be > bin_t_min, got bin_t_min={self.bin_t_min!r}, bin_t_max={self.bin_t_max!r}.")
        if not 0.0 <= self.ratio_ema_rate < 1.0:
            raise ValueError(f"ratio_ema_rate must be in [0, 1), got {self.ratio_ema_rate!r}.")


class FDivergenceWeight:
    """Per-sample weights ``h(r)`` from discriminator logits, two-stage normalised (spec 2.3).

    Keeps the per-bin EMA as plain tensors exposed through :meth:`state_dict` (saved in the trainer's
    checkpoint, not on any network, spec correction 0.9). ``reduce`` sums a tensor over processes
    (default: ``torch.distributed`` all-reduce when initialised), so bin means and the batch mean are
    global (sums and counts, spec correction 0.10).
    """

    def __init__(self, config: RatioConfig | None = None, reduce: Callable[[torch.Tensor], torch.Tensor] = all_reduce_sum,
                 **kwargs):
        self.config = config if config is not None else RatioConfig(**kwargs)
        if config is not None and kwargs:
            raise TypeError("pass either config or keyword options, not both.")
        self.reduce = reduce
        n = self.config.num_bins
        self.ema_mean = torch.ones(n, dtype=torch.float64)
        self.ema_seen = torch.zeros(n, dtype=torch.bool)

    @property
    def is_identity(self) -> bool:
        return self.config.divergence == "rkl"

    def bin_index(self, t: torch.Tensor) -> torch.Tensor:
        c = self.config
        t_min = 0.0 if c.bin_t_min is None else c.bin_t_min
        t_max = 1000.0 if c.bin_t_max is None else c.bin_t_max
        pos = (t.detach().double().reshape(-1) - t_min) / (t_max - t_min) * c.num_bins
        return pos.floor().long().clamp(0, c.num_bins - 1)

    def normalize_ratio(self, r: torch.Tensor, t: torch.Tensor, update: bool = True) -> torch.Tensor:
        """``r`` divided by its (global, optionally EMA'd) mean in its time bin."""
        n = self.config.num_bins
        idx = self.bin_index(t).to(r.device)
        stats = torch.zeros(2, n, dtype=torch.float64, device=r.device)
        stats[0].index_add_(0, idx, r.double())
        stats[1].index_add_(0, idx, torch.ones_like(r, dtype=torch.float64))
        stats = self.reduce(stats)
        seen = stats[1] > 0
        mean = torch.where(seen, stats[0] / stats[1].clamp(min=1.0), torch.ones_like(stats[0]))
        rate = self.config.ratio_ema_rate
        if rate > 0.0:
            ema, ema_seen = self.ema_mean.to(r.device), self.ema_seen.to(r.device)
            blended = torch.where(ema_seen, rate * ema + (1.0 - rate) * mean, mean)
            mean = torch.where(seen, blended, ema)
            if update:
                self.ema_mean = mean.detach().cpu()
                self.ema_seen = (ema_seen | seen).cpu()
        return (r.double() / mean[idx]).to(r.dtype)

    def __call__(self, logits: torch.Tensor, t: torch.Tensor, update: bool = True) -> torch.Tensor:
        """Weights ``h`` (float32, ``[B]``, detached, batch mean 1) for logits ``[B]`` at times ``t``."""
        c = self.config
        if self.is_identity:  # reverse KL: exactly 1, no statistics (spec 0.1)
            return torch.ones(logits.shape[0], dtype=torch.float32, device=logits.device)
        r = density_ratio(logits.reshape(-1), logit_clamp=c.logit_clamp, ratio_lower=c.ratio_lower,
                          ratio_upper=c.ratio_upper)
        if c.ratio_normalization:
            r = self.normalize_ratio(r, t, update=update)
        h = h_weight(c.divergence, r)
        stats = self.reduce(torch.stack([h.double().sum(), torch.tensor(float(h.numel()), dtype=torch.float64,
                                                                          device=h.device)]))
        return (h / (stats[0] / stats[1] + c.h_eps).to(h.dtype)).detach()

    # ------------------------------------------------------------------ trainer state (spec 0.9)
    def state_dict(self) -> dict:
        return {"ema_mean": self.ema_mean.clone(), "ema_seen": self.ema_seen.clone()}

    def load_state_dict(self, state: dict) -> None:
        n = self.config.num_bins
        mean, seen = torch.as_tensor(state["ema_mean"]), torch.as_tensor(state["ema_seen"])
        if mean.shape != (n,) or seen.shape != (n,):
            raise ValueError(f"ratio EMA state must hold {n} bins (num_bins), got shapes {tuple(mean.shape)}, "
                             f"{tuple(seen.shape)}.")
        self.ema_mean, self.ema_seen = mean.double().clone(), seen.bool().clone()
