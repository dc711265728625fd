"""Denoiser: one diffusers network plus its parameterisation, giving data and noise predictions.

Following the k-diffusion/EDM split (Karras et al. 2022, arXiv:2206.00364), the network is wrapped
once, here, and everything else (guidance, solvers) works with ``x0`` and ``eps``. Inputs are the
*model inputs* ``x_t = alpha x0 + sigma eps`` (after the scheduler's ``scale_model_input``), so the
conversion only needs ``alpha(t), sigma(t)`` from the model's training :class:`NoiseSchedule`.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .schedule import NoiseSchedule

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


def _model_family(model: torch.nn.Module) -> str:
    """How the network is called: ``"unet"`` (x, t positional) or ``"transformer"`` (hidden_states=)."""
    name = type(model).__name__
    if name.startswith("UNet"):
        return "unet"
    if "Transformer" in name or name.startswith("DiT"):
        return "transformer"
    raise TypeError(
        f"model must be a diffusers UNet2DModel, UNet2DConditionModel, DiT/Transformer2DModel or "
        f"SD3Transformer2DModel, got {name}."
    )


def concat_conditions(conds: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Concatenate condition dicts along the batch (tensors, nested dicts); other values must agree."""
    out: dict[str, Any] = {}
    for key in conds[0]:
        values = [c[key] for c in conds]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.cat(values, dim=0)
        elif isinstance(values[0], Mapping):
            out[key] = concat_conditions(values)
        else:
            out[key] = values[0]
    return out


class Denoiser:
    """Wrap a diffusers network and its prediction type into ``x0``/``eps`` predictions.

    Args:
        model: ``UNet2DModel``, ``UNet2DConditionModel``, ``DiTTransformer2DModel``/``Transformer2DModel``
            or ``SD3Transformer2DModel``.
        schedule: the model's training noise schedule.
        prediction_type: ``"epsilon"``, ``"v_prediction"`` (Salimans & Ho 2022), ``"sample"`` or
            ``"flow"`` (velocity ``eps - x0`` of rectified flow, Liu et al. 2022).

    Networks that also output a learned variance (``out_channels == 2 * in_channels``, as DiT) have
    those channels dropped, as diffusers' DiTPipeline does.
    """

    def __init__(self, model: torch.nn.Module, schedule: NoiseSchedule, prediction_type: str = "epsilon"):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}.")
        self.model = model
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.family = _model_family(model)

    @classmethod
    def from_scheduler(cls, model: torch.nn.Module, scheduler) -> "Denoiser":
        """Build from a model and the diffusers scheduler it was trained with."""
        config = scheduler.config
        prediction_type = config.get("prediction_type", "epsilon") or "epsilon"
        if "FlowMatch" in type(scheduler).__name__:
            prediction_type = "flow"
        return cls(model, NoiseSchedule.from_scheduler_config(scheduler), prediction_type)

    # ------------------------------------------------------------------ network call
    def __call__(self, x: torch.Tensor, t: torch.Tensor | float, cond: Mapping[str, Any]) -> torch.Tensor:
        """One forward pass: the raw network output for model input ``x`` at timestep ``t``."""
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t[None]
        t = t.expand(x.shape[0])
        if self.family == "unet":
            out = self.model(x, t, **cond, return_dict=False)[0]
        else:
            out = self.model(hidden_states=x, timestep=t, **cond, return_dict=False)[0]
        if out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]
        return out

    # ------------------------------------------------------------------ parameterisation
    def alpha_sigma(self, t: torch.Tensor | float, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, s = self.schedule.alpha_sigma(torch.as_tensor(t).detach().cpu().double())
        shape = (-1,) + (1,) * (like.ndim - 1) if a.ndim else ()
        return (a.to(like.device, like.dtype).reshape(shape), s.to(like.device, like.dtype).reshape(shape))

    def to_x0_eps(self, out: torch.Tensor, x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Data and noise predictions from the raw output ``out`` at model input ``x``."""
        a, s = self.alpha_sigma(t, x)
        p = self.prediction_type
        if p == "epsilon":
            eps = out
            x0 = (x - s * eps) / a
        elif p == "v_prediction":  # v = a eps - s x0 with a^2 + s^2 = 1
            x0 = a * x - s * out
            eps = s * x + a * out
        elif p == "sample":
            x0 = out
            eps = (x - a * x0) / s
        else:  # flow: out = eps - x0, x = (1 - s) x0 + s eps
            x0 = x - s * out
            eps = x + a * out
        return x0, eps

    def from_x0(self, x0: torch.Tensor, x: torch.Tensor, t) -> torch.Tensor:
        """The raw output that corresponds to data prediction ``x0`` at model input ``x``."""
        a, s = self.alpha_sigma(t, x)
        p = self.prediction_type
        if p == "sample":
            return x0
        eps = (x - a * x0) / s
        if p == "epsilon":
            return eps
        if p == "v_prediction":
            return a * eps - s * x0
        return eps - x0
