"""diffusers community-pipeline entry file for fastgen's FastGenStableDiffusionPipeline.

    DiffusionPipeline.from_pretrained(folder, custom_pipeline="pipelines/fastgen_sd_pipeline.py", trust_remote_code=True)

returns a FastGenStableDiffusionPipeline for any standard folder of its family (requires `pip install fastgen`).
One pipeline class per file: diffusers picks the single DiffusionPipeline subclass it finds here.
"""
from fastgen.pipelines.stable_diffusion import FastGenStableDiffusionPipeline  # noqa: F401
