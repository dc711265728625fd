"""FastGen pipelines: diffusers pipelines driven by fastgen's sampling loop.

The text-to-image pipelines load on first use (they import transformers).
"""
import importlib

from .class_conditional import FastGenClassPipeline
from .common import FastGenPipelineOutput

_LAZY = {
    "FastGenStableDiffusionPipeline": ".stable_diffusion",
    "FastGenStableDiffusionXLPipeline": ".stable_diffusion_xl",
    "FastGenStudentPipeline": ".student",
    "FastGenMSDPipeline": ".msd",
}

__all__ = ["FastGenClassPipeline", "FastGenPipelineOutput", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
