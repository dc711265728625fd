"""diffusers entry file: lets DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
return fastgen's FastGenClassPipeline (requires `pip install fastgen`)."""
from fastgen.pipelines.class_conditional import FastGenClassPipeline  # noqa: F401
