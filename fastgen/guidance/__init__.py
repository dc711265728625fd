"""Guidance methods for FastGen pipelines; each is a ``diffusers.guiders.BaseGuidance`` subclass.

The sampling loop drives them with the diffusers guider protocol: ``set_state(step, N, t)``, then
``num_conditions`` (1: conditional only, 2: conditional and unconditional) and
``forward(pred_cond=..., pred_uncond=...)``.
"""
from __future__ import annotations

import math
import warnings

from typing import Callable

from diffusers.guiders import BaseGuidance

from .adaptive import AdaptiveGuidance, LinearAG, fit_linear_ag_coefficients, load_linear_ag_coefficients
from .apg import APG
from .cfg import CFG

# name -> factory(guidance_scale), each with its paper's defaults. "linear-ag" finds its fitted coefficients
# next to the model at the start of a run (see LinearAG).
GUIDANCE_REGISTRY: dict[str, Callable[[float], BaseGuidance]] = {
    "cfg": lambda scale: CFG(guidance_scale=scale),
    "apg": lambda scale: APG(guidance_scale=scale),
    "ag": lambda scale: AdaptiveGuidance(guidance_scale=scale),
    "linear-ag": lambda scale: LinearAG(guidance_scale=scale),
}


def available_guidance() -> list[str]:
    """Registered guidance names, CFG first, then in order of registration."""
    return list(GUIDANCE_REGISTRY)


# Scales above this are almost always a typo (SD uses 3-12); they are allowed, with a warning.
LARGE_GUIDANCE_SCALE = 50.0


def check_guidance_scale(guidance_scale, name: str = "guidance_scale") -> float:
    """A guidance scale must be a finite number >= 0 (diffusers' meaning: <= 1 runs no unconditional branch);
    negative scales would steer *away* from the condition and are refused; very large ones warn. ``name``:
    the argument's name in the error (a command's own option name)."""
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(guidance_scale).__name__}.")
    if not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (1 = no guidance), got {guidance_scale!r}.")
    if guidance_scale > LARGE_GUIDANCE_SCALE:
        warnings.warn(f"guidance_scale {guidance_scale:g} is far above the usual range (1-15); samples will likely "
                      f"be saturated blobs.", stacklevel=3)
    return float(guidance_scale)


def resolve_guidance(guidance, guidance_scale: float) -> BaseGuidance | None:
    """Turn the pipeline's ``guidance=`` argument into a guider (or ``None``: conditional only).

    ``None`` keeps diffusers' behaviour: CFG when ``guidance_scale > 1``, otherwise no guidance.
    """
    check_guidance_scale(guidance_scale)
    if guidance is None:
        return CFG(guidance_scale=float(guidance_scale)) if guidance_scale > 1 else None
    if isinstance(guidance, BaseGuidance):
        return guidance
    if isinstance(guidance, str):
        key = guidance.lower().replace("_", "-")
        if key in GUIDANCE_REGISTRY:
            return GUIDANCE_REGISTRY[key](float(guidance_scale))
    raise ValueError(
        f"guidance must be None, one of {available_guidance()}, or a diffusers BaseGuidance object; got {guidance!r}."
    )


__all__ = ["APG", "AdaptiveGuidance", "CFG", "GUIDANCE_REGISTRY", "LinearAG", "available_guidance",
           "check_guidance_scale", "fit_linear_ag_coefficients", "load_linear_ag_coefficients", "resolve_guidance"]
