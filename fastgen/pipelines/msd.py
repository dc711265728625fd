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
from .student import FastGenStudentPipeline, student_scheduler

MAX_STUDENTS = 8
EXTRA = tuple(f"unet_{k}" for k in range(1, MAX_STUDENTS))


class UNetRouter(torch.nn.Module):
    """K class-conditional student networks behind a class partition, called like one ``UNet2DModel``: each
    forward sends every row to its student (one batched call per student present) and returns the outputs in
    input order, so every image costs one network evaluation per step. (Named ``UNet*`` so that
    :class:`~fastgen.denoiser.Denoiser` calls it as a UNet.)"""

    def __init__(self, networks: Sequence[torch.nn.Module], partition):
        super().__init__()
        self.networks = torch.nn.ModuleList(networks)
        self.partition = partition
        self.config = networks[0].config

    @property
    def dtype(self) -> torch.dtype:
        return self.networks[0].dtype

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor, return_dict: bool = False):
        timestep = torch.as_tensor(timestep, device=sample.device).expand(sample.shape[0])
        return (self.partition.route(class_labels.cpu(), sample.device, lambda k, rows: self.networks[k](
            sample[rows], timestep[rows], class_labels=class_labels[rows], return_dict=False)[0]),)


class FastGenMSDPipeline(FastGenStudentPipeline):
    """Routed multi-student pipeline: ``pipe(class_labels=[...])`` (the call of
    :class:`~fastgen.pipelines.FastGenStudentPipeline` on :class:`UNetRouter`); see the module docstring."""

    _fastgen_entry = "fastgen_msd_pipeline"
    _optional_components = ["unet", "transformer", "vae", *EXTRA]

    def __init__(self, scheduler, unet=None, transformer=None, vae=None, id2label: dict | None = None,
                 student_timesteps: Sequence[int] | None = None, partition: dict | None = None,
                 student_renoise: str = "fresh", unet_1=None, unet_2=None, unet_3=None, unet_4=None, unet_5=None,
                 unet_6=None, unet_7=None):
        if transformer is not None:
            raise ValueError("FastGenMSDPipeline holds UNet2DModel students (unet, unet_1, ...), not a transformer.")
        super().__init__(scheduler=scheduler, unet=unet, vae=vae, id2label=id2label,
                         student_timesteps=student_timesteps, student_renoise=student_renoise)
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
        self.partition = part
        if part.num_classes != self.num_classes:
            raise ValueError(f"the partition covers {part.num_classes} classes, the students {self.num_classes}.")
        self.register_to_config(partition=part.to_dict())

    @classmethod
    def from_students(cls, teacher_pipeline, networks: Sequence[torch.nn.Module], student_timesteps: Sequence[int],
                      partition, prediction_type: str | None = None, student_renoise: str = "fresh"
                      ) -> "FastGenMSDPipeline":
        """The routed pipeline of trained ``networks`` (student k serves part k) with the teacher's scheduler/VAE
        (in ``prediction_type`` when the students predict another quantity than the teacher)."""
        if not 1 <= len(networks) <= MAX_STUDENTS:
            raise ValueError(f"FastGenMSDPipeline holds 1 to {MAX_STUDENTS} students, got {len(networks)}.")
        nets = {("unet" if k == 0 else f"unet_{k}"): net for k, net in enumerate(networks)}
        return cls(scheduler=student_scheduler(teacher_pipeline.scheduler, prediction_type, student_renoise),
                   vae=getattr(teacher_pipeline, "vae", None), student_renoise=student_renoise,
                   id2label=teacher_pipeline.config.get("id2label"), student_timesteps=list(student_timesteps),
                   partition=partition.to_dict() if hasattr(partition, "to_dict") else partition, **nets)

    @property
    def network(self) -> "UNetRouter":
        """The K students behind the router, called like one network (what the student call loop runs)."""
        return UNetRouter(self.students, self.partition)

    @property
    def students(self) -> list[torch.nn.Module]:
        """The student networks, student k at index k."""
        return [self.unet] + [getattr(self, name) for name in EXTRA if getattr(self, name, None) is not None]

    def route(self, class_labels) -> torch.Tensor:
        """The student index of each requested class (LongTensor ``[B]``)."""
        return self.partition.assign(self._class_label_tensor(class_labels).cpu())


def _load_builtin_msd(path, **kwargs) -> FastGenMSDPipeline:
    """``fastgen.load_builtin("digits-msd4")``: routed one-step students of the built-in digits model."""
    kwargs.setdefault("dtype", torch.float32)  # weights may be stored in float16 (a smaller asset)
    return FastGenMSDPipeline.from_pretrained(path, **kwargs)
