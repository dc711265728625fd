"""diffusers community-pipeline entry file for fastgen's FastGenStableDiffusionXLPipeline.

    DiffusionPipeline.from_pretrained(folder, custom_pipeline="pipelines/fastgen_sdxl_pipeline.py", trust_remote_code=True)

returns a FastGenStableDiffusionXLPipeline for any standard folder of its family (requires `pip install fastgen`).
One pipeline class per file: diffusers picks the single DiffusionPipeline subclass it finds here.
"""
from fastgen.pipelines.stable_diffusion_xl import FastGenStableDiffusionXLPipeline  # noqa: F401
