"""Noise schedules as continuous functions of the network's time input.

A diffusion model sees ``x_t = alpha(t) * x0 + sigma(t) * eps``; every sampler, guidance method and
teleportation jump in fastgen works with ``alpha``, ``sigma`` and the half log-SNR
``lambda = log(alpha / sigma)`` (Lu et al. 2022, DPM-Solver, arXiv:2206.00927). ``NoiseSchedule`` is
built from any diffusers scheduler config and answers these for the *timestep value the network
receives*, so it works whatever sampler produced that timestep.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Mapping

import torch

_KINDS = ("vp_discrete", "edm", "flow")
_VP_KEYS = ("beta_start", "beta_schedule", "trained_betas")


def scheduler_config_dict(config) -> dict[str, Any]:
    """A scheduler's config as a plain dict whose ``_class_name`` names the scheduler class (diffusers leaves it
    out of a live instance's ``config``)."""
    if hasattr(config, "config"):
        return {"_class_name": type(config).__name__, **dict(config.config)}
    return dict(config)


def is_flow_config(config) -> bool:
    """The ONE rule for flow-matching (rectified-flow) models, for a scheduler or its config: a ``FlowMatch*``
    scheduler, or a multistep solver in flow mode (``use_flow_sigmas=True`` or
    ``prediction_type="flow_prediction"``, as diffusers' DPM-Solver/UniPC and fastgen's USFScheduler)."""
    cfg = scheduler_config_dict(config)
    return _is_flow_match(cfg) or bool(cfg.get("use_flow_sigmas")) or cfg.get("prediction_type") == "flow_prediction"


def _is_flow_match(cfg: Mapping[str, Any]) -> bool:
    """A FlowMatch* scheduler's config: named so, or (a config without ``_class_name``) with FlowMatch's
    ``shift`` key and no VP beta keys."""
    if cfg.get("_class_name"):
        return str(cfg["_class_name"]).startswith("FlowMatch")
    return "shift" in cfg and not any(k in cfg for k in _VP_KEYS)


def _betas_from_config(config: Mapping[str, Any]) -> torch.Tensor:
    """The training betas of a DDPM-style config (same formulas as diffusers' DDPMScheduler)."""
    n = int(config.get("num_train_timesteps", 1000))
    if config.get("trained_betas") is not None:
        return torch.tensor(config["trained_betas"], dtype=torch.float64)
    kind = config.get("beta_schedule", "linear")
    beta_start, beta_end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    if kind == "linear":
        # diffusers builds these in float32 and so do we, so alphas_cumprod match its tables exactly.
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float32).double()
    if kind == "scaled_linear":
        return (torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2).double()
    if kind == "squaredcos_cap_v2":
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
        return torch.tensor(betas, dtype=torch.float32).double()
    raise ValueError(
        f"beta_schedule must be one of 'linear', 'scaled_linear', 'squaredcos_cap_v2', got {kind!r}."
    )


class NoiseSchedule:
    """alpha(t), sigma(t), lambda(t) and the inverse lambda -> t, for the network's time input ``t``.

    Kinds:
        * ``"vp_discrete"``: variance preserving, trained on integer timesteps ``0..T-1`` with
          ``alphas_cumprod`` from betas (linear, scaled_linear, squaredcos_cap_v2). Fractional
          timesteps (Karras/Euler samplers) interpolate lambda linearly, as diffusers does with
          ``log(sigma)``.
        * ``"edm"``: variance exploding with alpha = 1 and sigma = t (Karras et al. 2022, EDM); the
          network's noise input is ``c_noise = log(sigma) / 4``, which ``timestep_from_t`` returns.
        * ``"flow"``: rectified flow, ``x_t = (1 - s) x0 + s eps`` with ``s = t / num_train_timesteps``
          (diffusers' FlowMatchEulerDiscreteScheduler feeds ``sigma * 1000`` as timestep).
    """

    def __init__(
        self,
        kind: str,
        *,
        alphas_cumprod: torch.Tensor | None = None,
        num_train_timesteps: int = 1000,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
    ):
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}.")
        self.kind = kind
        self.num_train_timesteps = int(num_train_timesteps)
        self.sigma_min, self.sigma_max, self.sigma_data = float(sigma_min), float(sigma_max), float(sigma_data)
        if kind == "vp_discrete":
            if alphas_cumprod is None:
                raise ValueError("alphas_cumprod is required for kind='vp_discrete'.")
            ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
            self.alphas_cumprod = ac
            # lambda_k = log(alpha_k / sigma_k), strictly decreasing in k.
            self._lambdas = 0.5 * (torch.log(ac) - torch.log1p(-ac))
            self._grid = torch.arange(len(ac), dtype=torch.float64)
            self.num_train_timesteps = len(ac)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_scheduler_config(cls, config) -> "NoiseSchedule":
        """Build from a diffusers scheduler or its config (``pipe.scheduler`` / ``pipe.scheduler.config``)."""
        config = scheduler_config_dict(config)
        n = int(config.get("num_train_timesteps", 1000))
        if is_flow_config(config):
            return cls("flow", num_train_timesteps=n)
        is_vp = any(k in config for k in _VP_KEYS)
        if str(config.get("_class_name", "")).startswith("EDM") or (not is_vp and "sigma_data" in config):
            return cls(
                "edm",
                sigma_min=config.get("sigma_min", 0.002),
                sigma_max=config.get("sigma_max", 80.0),
                sigma_data=config.get("sigma_data", 0.5),
            )
        betas = _betas_from_config(config)
        alphas_cumprod = torch.cumprod((1.0 - betas.float()), dim=0).double()
        return cls("vp_discrete", alphas_cumprod=alphas_cumprod)

    def to(self, device: str | torch.device) -> "NoiseSchedule":
        """This schedule with its tables on ``device`` (the maps then run there, without a host round trip)."""
        out = copy.copy(self)
        if self.kind == "vp_discrete":
            out.alphas_cumprod = self.alphas_cumprod.to(device)
            out._lambdas = self._lambdas.to(device)
            out._grid = self._grid.to(device)
        return out

    # ------------------------------------------------------------------ forward maps
    def lambda_(self, t: torch.Tensor | float) -> torch.Tensor:
        """Half log-SNR ``lambda(t) = log(alpha(t) / sigma(t))`` (float64)."""
        t = self._as_time(t)
        if self.kind == "vp_discrete":
            return _interp(t, self._grid, self._lambdas)
        if self.kind == "edm":
            return -torch.log(t)
        s = t / self.num_train_timesteps
        return torch.log1p(-s) - torch.log(s)

    def alpha_sigma(self, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha(t), sigma(t))`` in float64 for the network time input ``t``."""
        t = self._as_time(t)
        if self.kind == "vp_discrete":
            lam = self.lambda_(t)
            return torch.sqrt(torch.sigmoid(2 * lam)), torch.sqrt(torch.sigmoid(-2 * lam))
        if self.kind == "edm":
            return torch.ones_like(t), t
        s = t / self.num_train_timesteps
        return 1 - s, s

    # ------------------------------------------------------------------ inverse maps
    def t_from_lambda(self, lam: torch.Tensor | float) -> torch.Tensor:
        """Inverse of :meth:`lambda_` (float64); clamps to the trained range for ``vp_discrete``."""
        lam = self._as_time(lam)
        if self.kind == "vp_discrete":
            # lambdas decrease with t: interpolate on the flipped (increasing) table.
            return _interp(lam, self._lambdas.flip(0), self._grid.flip(0))
        if self.kind == "edm":
            return torch.exp(-lam)
        return self.num_train_timesteps * torch.sigmoid(-lam)

    def timestep_from_t(self, t: torch.Tensor | float) -> torch.Tensor:
        """What the network receives for time ``t`` (``c_noise`` for EDM, ``t`` otherwise)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return 0.25 * torch.log(t) if self.kind == "edm" else t

    def _as_time(self, t) -> torch.Tensor:
        """``t`` as float64 on the tables' device (CPU for non-tabled kinds: the device of ``t``)."""
        device = self._grid.device if self.kind == "vp_discrete" else None
        if isinstance(t, torch.Tensor):
            return t.to(device=device or t.device, dtype=torch.float64)
        return torch.as_tensor(t, dtype=torch.float64, device=device)

    @property
    def t_min(self) -> float:
        return {"vp_discrete": 0.0, "edm": self.sigma_min, "flow": 0.0}[self.kind]

    @property
    def t_max(self) -> float:
        return {"vp_discrete": self.num_train_timesteps - 1.0, "edm": self.sigma_max,
                "flow": float(self.num_train_timesteps)}[self.kind]

    def __repr__(self) -> str:
        return f"NoiseSchedule(kind={self.kind!r}, num_train_timesteps={self.num_train_timesteps})"


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation (numpy.interp semantics, clamped at the ends) for increasing ``xp``."""
    x_flat = x.reshape(-1).clamp(xp[0], xp[-1])
    idx = torch.searchsorted(xp, x_flat, right=True).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    w = (x_flat - x0) / (x1 - x0)
    return (f0 + w * (f1 - f0)).reshape(x.shape)
