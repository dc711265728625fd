"""diffusers entry file: lets DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
return fastgen's FastGenStudentPipeline (requires `pip install fastgen`)."""
from fastgen.pipelines.student import FastGenStudentPipeline  # noqa: F401
