"""FastGen pipelines: diffusers pipelines driven by fastgen's sampling loop."""
from .class_conditional import FastGenClassPipeline
from .common import FastGenPipelineOutput

__all__ = ["FastGenClassPipeline", "FastGenPipelineOutput"]
