"""FastGen pipelines: diffusers pipelines driven by fastgen's sampling loop."""
from .class_conditional import FastGenClassPipeline
from .common import FastGenPipelineOutput
from .stable_diffusion import FastGenStableDiffusionPipeline
from .stable_diffusion_xl import FastGenStableDiffusionXLPipeline

__all__ = [
    "FastGenClassPipeline",
    "FastGenPipelineOutput",
    "FastGenStableDiffusionPipeline",
    "FastGenStableDiffusionXLPipeline",
]
