"""diffusers entry file: lets DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
return fastgen's FastGenMSDPipeline (requires `pip install fastgen`)."""
from fastgen.pipelines.msd import FastGenMSDPipeline  # noqa: F401
