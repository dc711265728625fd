"""diffusers community-pipeline entry file for fastgen's FastGenClassPipeline.

    DiffusionPipeline.from_pretrained(folder, custom_pipeline="pipelines/fastgen_class_pipeline.py", trust_remote_code=True)

returns a FastGenClassPipeline for any standard folder of its family (requires `pip install fastgen`).
One pipeline class per file: diffusers picks the single DiffusionPipeline subclass it finds here.
"""
from fastgen.pipelines.class_conditional import FastGenClassPipeline  # noqa: F401
