"""FastGenMSDPipeline: K distilled one- (or few-) step students behind a router (multi-student distillation).

Song et al., *Multi-student Diffusion Distillation for Better One-step Generators*, arXiv:2410.23274.
The partition (:class:`fastgen.training.msd.Partition`, stored in ``model_index.json``) maps each class to
one student; a call routes every requested class to its student, runs each student once on its rows and
returns the images in input order. A one-step student costs one network evaluation per image, whichever
student serves it (``.nfe == len(student_timesteps)``). Each image's noise is drawn in input order before
routing (per-row generators with ``seed=``), so an image does not depend on the other rows of the batch.

Components: ``unet`` (student 0) and ``unet_1`` ... ``unet_7`` (students 1..K-1, ``None`` beyond K), the
shared ``scheduler`` and optional ``vae``; students may have different widths (smaller MSD students).
Reload with ``FastGenMSDPipeline.from_pretrained(folder)``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..denoiser import Denoiser
from .common import FastGenPipelineOutput
from .student import FastGenStudentPipeline, student_scheduler

MAX_STUDENTS = 8
EXTRA = tuple(f"unet_{k}" for k in range(1, MAX_STUDENTS))


class FastGenMSDPipeline(FastGenStudentPipeline):
    """Routed multi-student pipeline: ``pipe(class_labels=[...])``; see the module docstring."""

    _fastgen_entry = "fastgen_msd_pipeline"
    _optional_components = ["unet", "transformer", "vae", *EXTRA]

    def __init__(self, scheduler, unet=None, transformer=None, vae=None, id2label: dict | None = None,
                 student_timesteps: Sequence[int] | None = None, partition: dict | None = None,
                 unet_1=None, unet_2=None, unet_3=None, unet_4=None, unet_5=None, unet_6=None, unet_7=None):
        if transformer is not None:
            raise ValueError("FastGenMSDPipeline holds UNet2DModel students (unet, unet_1, ...), not a transformer.")
        super().__init__(scheduler=scheduler, unet=unet, vae=vae, id2label=id2label,
                         student_timesteps=student_timesteps)
        extra = dict(zip(EXTRA, (unet_1, unet_2, unet_3, unet_4, unet_5, unet_6, unet_7)))
        self.register_modules(**extra)
        from ..training.msd import Partition

        if partition is None:
            raise ValueError("partition is required: the router's class -> student table (Partition.to_dict()).")
        part = partition if isinstance(partition, Partition) else Partition.from_dict(partition)
        if part.kind != "classes":
            raise ValueError(f"FastGenMSDPipeline routes class labels; got a {part.kind!r} partition.")
        count = 1 + sum(v is not None for v in extra.values())
        present = [k for k, v in enumerate([unet, *extra.values()]) if v is not None]
        if present != list(range(count)) or part.num_parts != count:
            raise ValueError(f"the partition has {part.num_parts} parts but the pipeline holds students {present} "
                             f"(expected unet, unet_1, ... unet_{part.num_parts - 1}).")
        if part.num_classes != self.num_classes:
            raise ValueError(f"the partition covers {part.num_classes} classes, the students {self.num_classes}.")
        self.partition = part
        self.register_to_config(partition=part.to_dict())

    @classmethod
    def from_students(cls, teacher_pipeline, networks: Sequence[torch.nn.Module], student_timesteps: Sequence[int],
                      partition) -> "FastGenMSDPipeline":
        """The routed pipeline of trained ``networks`` (student k serves part k) with the teacher's scheduler/VAE."""
        if not 1 <= len(networks) <= MAX_STUDENTS:
            raise ValueError(f"FastGenMSDPipeline holds 1 to {MAX_STUDENTS} students, got {len(networks)}.")
        nets = {("unet" if k == 0 else f"unet_{k}"): net for k, net in enumerate(networks)}
        return cls(scheduler=student_scheduler(teacher_pipeline.scheduler), vae=getattr(teacher_pipeline, "vae", None),
                   id2label=teacher_pipeline.config.get("id2label"), student_timesteps=list(student_timesteps),
                   partition=partition.to_dict() if hasattr(partition, "to_dict") else partition, **nets)

    @property
    def students(self) -> list[torch.nn.Module]:
        """The student networks, student k at index k."""
        return [self.unet] + [getattr(self, name) for name in EXTRA if getattr(self, name, None) is not None]

    def route(self, class_labels) -> torch.Tensor:
        """The student index of each requested class (LongTensor ``[B]``)."""
        return self.partition.assign(self._class_label_tensor(class_labels).cpu())

    @torch.no_grad()
    def __call__(self, class_labels=None, num_inference_steps: int | None = None, timesteps: Sequence[int] | None = None,
                 guidance_scale: float = 1.0, generator=None, seed=None, latents: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True, **kwargs):
        """Generate: route each class to its student, one student call per part present, images in input order.

        Arguments as :class:`~fastgen.pipelines.FastGenStudentPipeline`.
        """
        from ..training.students import Student, check_student_timesteps

        if kwargs:
            raise TypeError(f"FastGenMSDPipeline got unsupported arguments {sorted(kwargs)}; it accepts "
                            f"class_labels, timesteps, generator, seed, latents, output_type, return_dict.")
        if guidance_scale != 1.0:
            raise ValueError(f"guidance_scale must be 1.0 for distilled students (no CFG pass), got {guidance_scale!r}.")
        ts = check_student_timesteps(list(timesteps) if timesteps is not None else self.student_timesteps,
                                     int(self.scheduler.config.get("num_train_timesteps", 1000)))
        if num_inference_steps is not None and num_inference_steps != len(ts):
            raise ValueError(f"num_inference_steps must equal the students' {len(ts)} steps ({ts}), "
                             f"got {num_inference_steps!r}; pass timesteps= to run another list.")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be one of ('pil', 'np', 'pt', 'latent'), got {output_type!r}.")
        labels = self._class_label_tensor(class_labels)
        generator = self._generators_from_seed(seed, generator, len(labels))
        nets = self.students
        size = nets[0].config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        shape = (len(labels), nets[0].config.in_channels, height, width)
        device, dtype = self._execution_device, nets[0].dtype
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}.")
        latents = latents.to(device, dtype)
        parts = self.partition.assign(labels.cpu())
        x0 = torch.empty_like(latents)
        for k in parts.unique().tolist():  # one batched call per student, rows scattered back in input order
            rows = (parts == k).nonzero().reshape(-1)
            gen = [generator[i] for i in rows.tolist()] if isinstance(generator, list) else generator
            den = Denoiser.from_scheduler(nets[k], self.scheduler)
            student = Student(nets[k], den.schedule, den.prediction_type, ts)
            x0[rows.to(device)] = student.sample(latents[rows.to(device)], {"class_labels": labels[rows.to(labels.device)]},
                                                 gen).to(dtype)
        images = self._decode(x0, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return FastGenPipelineOutput(images=images, nfe=len(ts), steps=[{"timestep": int(t), "nfe": 1} for t in ts])
