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
from .interval import CFGInterval

# name -> factory(guidance_scale, **settings), each with its paper's defaults unless the model folder recommends
# settings (guidance.json, see model_settings). "linear-ag" finds its fitted coefficients next to the model at the
# start of a run (see LinearAG).
GUIDANCE_REGISTRY: dict[str, Callable[..., BaseGuidance]] = {
    "cfg": lambda scale, **kw: CFG(guidance_scale=scale, **kw),
    "apg": lambda scale, **kw: APG(guidance_scale=scale, **kw),
    "ag": lambda scale, **kw: AdaptiveGuidance(guidance_scale=scale, **kw),
    "linear-ag": lambda scale, **kw: LinearAG(guidance_scale=scale, **kw),
    "cfg-interval": lambda scale, **kw: CFGInterval(guidance_scale=scale, **kw),
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


def resolve_guidance(guidance, guidance_scale: float, model_path=None) -> BaseGuidance | None:
    """Turn the pipeline's ``guidance=`` argument into a guider (or ``None``: conditional only).

    ``None`` keeps diffusers' behaviour: CFG when ``guidance_scale > 1``, otherwise no guidance. A name gets the
    settings ``model_path``'s ``guidance.json`` recommends for it (:mod:`fastgen.guidance.model_settings`), else
    its paper's defaults; a guider object is used as given.
    """
    check_guidance_scale(guidance_scale)
    if guidance is None:
        return CFG(guidance_scale=float(guidance_scale)) if guidance_scale > 1 else None
    if isinstance(guidance, BaseGuidance):
        return guidance
    if isinstance(guidance, str):
        key = guidance.lower().replace("_", "-")
        if key in GUIDANCE_REGISTRY:
            from .model_settings import load_guidance_settings

            settings = load_guidance_settings(model_path).get(key, {})
            try:
                return GUIDANCE_REGISTRY[key](float(guidance_scale), **settings)
            except TypeError as err:
                raise ValueError(f"guidance settings for {key!r} in {model_path}: {err}") from None
    raise ValueError(
        f"guidance must be None, one of {available_guidance()}, or a diffusers BaseGuidance object; got {guidance!r}."
    )


__all__ = ["APG", "AdaptiveGuidance", "CFG", "CFGInterval", "GUIDANCE_REGISTRY", "LinearAG", "available_guidance",
           "check_guidance_scale", "fit_linear_ag_coefficients", "load_linear_ag_coefficients", "resolve_guidance"]
