"""FastGenStudentPipeline: a distilled one- or few-step class-conditional student as a diffusers pipeline.

A student (DMD2/f-distill, :mod:`fastgen.training`) is the teacher's architecture run at its own fixed
timestep list (``student_timesteps``, stored in ``model_index.json``): each step predicts ``x0``; between
steps ``x0`` is re-noised to the next timestep with fresh noise (``student_renoise: "fresh"``, DMD2) or with
the step's own noise estimate (``"ddim"``, a deterministic chain). One step = one network evaluation, no
CFG pass, so ``.nfe == len(student_timesteps)``.

Saved folders reload with ``FastGenStudentPipeline.from_pretrained(folder)`` and with
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``.

**Stock diffusers route.** The folder's scheduler is an ``LCMScheduler`` whose chain (``x0`` prediction,
then ``alpha x0 + sigma noise`` to the next custom timestep, the last step returning ``x0``) is the
student's, so the same weights run with diffusers alone::

    from diffusers import LCMScheduler, UNet2DModel
    from diffusers.utils.torch_utils import randn_tensor
    unet = UNet2DModel.from_pretrained(folder, subfolder="unet")
    scheduler = LCMScheduler.from_pretrained(folder, subfolder="scheduler")
    scheduler.set_timesteps(timesteps=student_timesteps)        # model_index.json: "student_timesteps"
    x = randn_tensor((n, 1, 16, 16), generator=generator)
    for t in scheduler.timesteps:
        eps = unet(x, t, class_labels=labels).sample
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
    images = (x / 2 + 0.5).clamp(0, 1)

(LCM's boundary condition ``c_skip(t) = 0.25 / ((10 t)^2 + 0.25)`` adds ``c_skip x_t`` to the ``x0``
prediction, about 5e-9 x_t at ``t = 700``: equal to fp32 rounding.) An SD/SDXL student saved as a
standard SD folder runs the same way in ``StableDiffusionPipeline``/``StableDiffusionXLPipeline`` with
``scheduler=LCMScheduler.from_config(pipe.scheduler.config)``, ``timesteps=student_timesteps`` and
``guidance_scale=1.0``.

A ``student_renoise: "ddim"`` student's folder holds a ``TCDScheduler`` instead: with ``eta=0.0`` (TCD's
gamma; its default is 0.3) its step re-noises ``x0`` with the step's own noise estimate, which is the
student's chain. Its last step continues to ``t = 0`` (``x0`` plus ``sqrt(1 - alpha_bar_0)`` of the noise
estimate, 1% on the digits schedule) and returns no ``x0``, so read ``x0`` from the last output::

    scheduler = TCDScheduler.from_pretrained(folder, subfolder="scheduler")
    scheduler.set_timesteps(timesteps=student_timesteps)
    for i, t in enumerate(scheduler.timesteps):
        eps = unet(x, t, class_labels=labels).sample
        if i + 1 < len(scheduler.timesteps):
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    a = scheduler.alphas_cumprod[t]
    images = (((x - (1 - a).sqrt() * eps) / a.sqrt()) / 2 + 0.5).clamp(0, 1)

In ``StableDiffusionPipeline`` a ``"ddim"`` SD student runs with ``scheduler=TCDScheduler.from_config(...)`` and
``eta=0.0`` (the pipeline passes ``eta`` to the step); its images then carry that last 1% step.
"""
from __future__ import annotations

from typing import Sequence

import torch
from diffusers import LCMScheduler, TCDScheduler
from diffusers.utils.torch_utils import randn_tensor

from ..denoiser import Denoiser
from ..training.config import DEFAULT_ONE_STEP_TIMESTEP
from .class_conditional import FastGenClassPipeline
from .common import FastGenPipelineOutput

DEFAULT_STUDENT_TIMESTEPS = (DEFAULT_ONE_STEP_TIMESTEP,)


def student_scheduler(teacher_scheduler, prediction_type: str | None = None, renoise: str = "fresh"):
    """The scheduler whose chain is the student's, on the teacher's training schedule (no clipping, no
    thresholding): ``LCMScheduler`` (``renoise="fresh"``) or ``TCDScheduler`` (``"ddim"``, run with
    ``eta=0``), in the teacher's parameterisation or in ``prediction_type`` (students trained from scratch
    may predict another quantity)."""
    import inspect

    from ..training.students import check_renoise

    cls = TCDScheduler if check_renoise(renoise) == "ddim" else LCMScheduler
    accepted = set(inspect.signature(cls.__init__).parameters)  # no warnings about a solver's own keys
    config = {k: v for k, v in teacher_scheduler.config.items() if k in accepted}
    if prediction_type is not None:
        config["prediction_type"] = prediction_type
    return cls.from_config(config, clip_sample=False, thresholding=False)


class FastGenStudentPipeline(FastGenClassPipeline):
    """A distilled class-conditional student: ``pipe(class_labels=[...])`` runs ``student_timesteps``.

    Components as :class:`~fastgen.pipelines.FastGenClassPipeline` (``unet`` or ``transformer``, optional
    ``vae``, ``scheduler``); config entries ``student_timesteps`` (descending list of ints) and
    ``student_renoise`` (``"fresh"`` or ``"ddim"``; folders without it are ``"fresh"``).
    """

    _fastgen_entry = "fastgen_student_pipeline"

    def __init__(self, scheduler, unet=None, transformer=None, vae=None, id2label: dict | None = None,
                 student_timesteps: Sequence[int] | None = None, student_renoise: str = "fresh"):
        super().__init__(scheduler=scheduler, unet=unet, transformer=transformer, vae=vae, id2label=id2label)
        from ..training.students import check_renoise, check_student_timesteps

        ts = check_student_timesteps(list(student_timesteps or DEFAULT_STUDENT_TIMESTEPS),
                                     int(scheduler.config.get("num_train_timesteps", 1000)))
        self.register_to_config(student_timesteps=ts, student_renoise=check_renoise(student_renoise, "student_renoise"))

    @classmethod
    def from_teacher(cls, teacher_pipeline, network: torch.nn.Module, student_timesteps: Sequence[int],
                     student_renoise: str = "fresh", prediction_type: str | None = None) -> "FastGenStudentPipeline":
        """The student pipeline of a trained ``network`` and the teacher's parts (in ``prediction_type`` when the
        student predicts another quantity than the teacher)."""
        key = "unet" if getattr(teacher_pipeline, "unet", None) is not None else "transformer"
        return cls(scheduler=student_scheduler(teacher_pipeline.scheduler, prediction_type, student_renoise),
                   vae=getattr(teacher_pipeline, "vae", None), id2label=teacher_pipeline.config.get("id2label"),
                   student_timesteps=list(student_timesteps), student_renoise=student_renoise, **{key: network})

    @property
    def student_timesteps(self) -> list[int]:
        return list(self.config.student_timesteps)

    @property
    def student_renoise(self) -> str:
        """``"fresh"`` or ``"ddim"``: how ``x0`` is re-noised between steps (:class:`~fastgen.training.students.Student`)."""
        return self.config.get("student_renoise", "fresh")

    @property
    def steps_label(self) -> str:
        """The student's steps for titles and logs: ``"t = [500]"``, ``"t = [500, 20], ddim re-noise"``."""
        label = f"t = {self.student_timesteps}"
        return label + (f", {self.student_renoise} re-noise" if len(self.student_timesteps) > 1 else "")

    @property
    def nfe(self) -> int:
        """Network evaluations per image: one per student step (no CFG pass)."""
        return len(self.student_timesteps)

    @torch.no_grad()
    def __call__(self, class_labels=None, num_inference_steps: int | None = None, timesteps: Sequence[int] | None = None,
                 guidance_scale: float = 1.0, generator=None, seed=None, latents: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True, renoise: str | None = None, **kwargs):
        """Generate with the student's own step list.

        Args:
            class_labels: class ids (or ``id2label`` names), one per image.
            num_inference_steps: optional; must equal the number of student steps when given.
            timesteps: another descending timestep list for the same weights (default: the student's).
            guidance_scale: must be 1 (a student runs without CFG).
            generator, seed, latents, output_type, return_dict: as :class:`FastGenClassPipeline`.
            renoise: ``"fresh"`` or ``"ddim"`` instead of the student's own ``student_renoise``.

        Returns:
            :class:`~fastgen.pipelines.FastGenPipelineOutput`, ``nfe`` = number of student steps.
        """
        from ..training.students import Student, check_renoise, check_student_timesteps

        if kwargs:
            raise TypeError(f"FastGenStudentPipeline got unsupported arguments {sorted(kwargs)}; it accepts "
                            f"class_labels, timesteps, renoise, generator, seed, latents, output_type, return_dict.")
        renoise = check_renoise(self.student_renoise if renoise is None else renoise)
        if guidance_scale != 1.0:
            raise ValueError(f"guidance_scale must be 1.0 for a distilled student (no CFG pass), got {guidance_scale!r}.")
        ts = check_student_timesteps(list(timesteps) if timesteps is not None else self.student_timesteps,
                                     int(self.scheduler.config.get("num_train_timesteps", 1000)))
        if num_inference_steps is not None and num_inference_steps != len(ts):
            raise ValueError(f"num_inference_steps must equal the student's {len(ts)} steps ({ts}), "
                             f"got {num_inference_steps!r}; pass timesteps= to run another list.")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be one of ('pil', 'np', 'pt', 'latent'), got {output_type!r}.")
        labels = self._class_label_tensor(class_labels)
        generator = self._generators_from_seed(seed, generator, len(labels))
        net = self.network
        size = net.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        shape = (len(labels), net.config.in_channels, height, width)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=net.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}.")
        den = Denoiser.from_scheduler(net, self.scheduler)
        student = Student(net, den.schedule, den.prediction_type, ts, renoise=renoise)
        x0 = student.sample(latents.to(self._execution_device, net.dtype), {"class_labels": labels}, generator)
        images = self._decode(x0, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return FastGenPipelineOutput(images=images, nfe=len(ts),
                                     steps=[{"timestep": int(t), "nfe": 1} for t in ts])


def _load_builtin_student(path, **kwargs) -> FastGenStudentPipeline:
    """``fastgen.load_builtin("digits-1step")``: the one-step student of the built-in digits model."""
    return FastGenStudentPipeline.from_pretrained(path, **kwargs)
