"""Attention backend selection: ``"auto" | "sdpa" | "xformers"`` for every network of a pipeline.

UNet-era models (SD 1.x/2.x, SDXL, UNet2DModel) use attention processors; xformers is installed with
``set_use_memory_efficient_attention_xformers`` and SDPA with ``AttnProcessor2_0``. Newer transformer
models use diffusers' attention dispatcher (``set_attention_backend``), which the processor route
does not reach, so each model is switched through the route it actually uses.
"""
from __future__ import annotations

import importlib.util

import torch

ATTENTION_MODES = ("auto", "sdpa", "xformers")


def xformers_available() -> bool:
    """True when xformers is importable and CUDA is present (xformers has no CPU kernels)."""
    return importlib.util.find_spec("xformers") is not None and torch.cuda.is_available()


def check_attention_mode(mode: str) -> str:
    """Validate ``attention=`` and resolve ``"auto"``; raises before any model work."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {mode!r}.")
    if mode == "auto":
        return "xformers" if xformers_available() else "sdpa"
    if mode == "xformers" and not xformers_available():
        missing = "the xformers package is not installed" if importlib.util.find_spec("xformers") is None else "CUDA is not available"
        raise ValueError(
            f"attention='xformers' cannot run here: {missing} (xformers has no CPU kernels). "
            f"Use attention='sdpa' or 'auto', or install fastgen[gpu] on a CUDA machine."
        )
    return mode


def _uses_dispatcher(model: torch.nn.Module) -> bool:
    return any(hasattr(getattr(m, "processor", None), "_attention_backend") for m in model.modules())


def set_attention(target, mode: str = "auto") -> str:
    """Switch every diffusers model in ``target`` (a pipeline or a model) to ``mode``; returns the mode used."""
    resolved = check_attention_mode(mode)
    from diffusers import ModelMixin
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    if isinstance(target, ModelMixin):
        models = [target]
    else:
        models = [m for m in getattr(target, "components", {}).values() if isinstance(m, ModelMixin)]
    for model in models:
        if _uses_dispatcher(model):
            model.set_attention_backend("xformers" if resolved == "xformers" else "native")
            continue
        # Processor-style attention (UNet2DModel has no set_attn_processor, so go module by module).
        for module in model.modules():
            if isinstance(module, Attention):
                if resolved == "xformers":
                    module.set_use_memory_efficient_attention_xformers(True)
                else:
                    module.set_processor(AttnProcessor2_0())
    return resolved
