"""fastgen: faster and better diffusion sampling inside the Hugging Face ecosystem.

Heavy submodules (diffusers, transformers) load on first use, so ``import fastgen`` stays cheap.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

from .builtin import available_builtins, builtin_path, load_builtin  # noqa: E402

_LAZY = {
    "FastGenClassPipeline": "fastgen.pipelines.class_conditional",
    "FastGenStableDiffusionPipeline": "fastgen.pipelines.stable_diffusion",
    "FastGenStableDiffusionXLPipeline": "fastgen.pipelines.stable_diffusion_xl",
    "FastGenStudentPipeline": "fastgen.pipelines.student",
    "FastGenPipelineOutput": "fastgen.pipelines.common",
    "NoiseSchedule": "fastgen.schedule",
    "Denoiser": "fastgen.denoiser",
    "GuidedDenoiser": "fastgen.denoiser",
    "Prediction": "fastgen.denoiser",
    "Parameterization": "fastgen.parameterization",
    "sample_loop": "fastgen.sampling",
    "set_attention": "fastgen.attention",
}

__all__ = ["__version__", "available_builtins", "builtin_path", "load_builtin", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastgen' has no attribute {name!r}")
