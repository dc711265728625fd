"""The contract between the generic distillation trainer and one distillation method.

The trainer (:mod:`fastgen.training.trainer`) is a short loop that knows nothing about DMD2 or
f-distill; a method (``fastgen/training/dmd2.py``, ``f_distill.py``, ...) knows nothing about
accelerate, checkpoints, logging or data loading. They meet here:

- :class:`Batch` is what the trainer hands the method on every micro-step (per process: the local
  share of the global batch).
- :class:`DistillMethod` is a ``torch.nn.Module`` that *holds the trainable networks as submodules*
  (student, fake score, discriminator head, ...) and *refers* to the frozen teacher without
  registering it as a submodule (so the teacher is neither optimised, nor wrapped by DDP/FSDP, nor
  saved in checkpoints; use :meth:`DistillMethod.set_teacher`).

Trainer loop (one *generator step*; iteration budgets such as ``max_train_steps``,
``checkpointing_steps`` and ``validation_steps`` count generator steps, spec §0.2)::

    repeat critic_steps_per_generator_step times:      # DMD2's dfake_gen_update_ratio
        for each of gradient_accumulation_steps micro-batches:
            out = method.critic_loss(batch); backward(out["loss"])
        clip, step and zero the "critic"-side optimisers   # every group except "generator"
    for each micro-batch:
        out = method.generator_loss(batch); backward(out["loss"])
    clip, step and zero the "generator" optimiser; EMA update of method.student()

Networks and optimisers: :meth:`DistillMethod.optimizer_groups` returns ``{name: [params]}``; the
trainer builds one AdamW (and one lr scheduler) per name. The group named ``"generator"`` is
stepped after :meth:`generator_loss`; all other groups (``"critic"``, ``"discriminator"``, ...) are
stepped after :meth:`critic_loss`. Each group may carry its own learning rate (trainer option
``learning_rate_<group>``, default ``learning_rate``).

Optional hooks with no-op defaults: :meth:`DistillMethod.begin_generator_step` (step-indexed schedules)
and :meth:`DistillMethod.export_pipeline` (a method that exports its own pipeline, e.g. MSD's router).

Losses return a ``dict[str, Tensor]`` with a scalar ``"loss"`` (what is back-propagated); every
other entry must be a scalar (or 0-d) tensor and is logged as ``<phase>/<key>`` (detached, averaged
over micro-steps and processes). Losses must be means over the local batch, so that the gradient of
a run with N processes equals the single-process gradient at the same global batch (DDP averages).

State that is neither a network weight nor an optimiser moment (e.g. the f-distill per-time-bin
ratio EMA, spec §0.9) is returned by :meth:`DistillMethod.trainer_state` and saved in the trainer's
checkpoint, never registered as a buffer on the student (it would leak into exported weights).

Randomness: the method must draw its times and noises only from ``batch.generator`` (a
``torch.Generator`` on the batch's device, seeded per process and per micro-step from the trainer
seed and the step counter), so a resumed run draws exactly what an uninterrupted one would.
"""
from __future__ import annotations

import abc

from dataclasses import dataclass
from typing import Any, Mapping

import torch


@dataclass
class Batch:
    """Inputs of one micro-step on one process.

    Attributes:
        labels: the condition per row. For class-conditional models a LongTensor ``[B]`` of class
            ids (the null class is the model's own, e.g. 10 for the digits model); text models
            will pass a dict of encoder outputs here.
        noise: the student's input noise ``z``, ``[B, C, H, W]``, standard normal.
        real: real data for the GAN term (pixels in [-1, 1] or VAE latents, the same space as the
            teacher's inputs), ``[B_real, C, H, W]``; ``None`` when the method needs no real data.
        real_labels: conditions of ``real`` (same format as ``labels``), or ``None``.
        generator: the RNG for every random draw the method makes in this micro-step.
    """

    labels: Any
    noise: torch.Tensor
    real: torch.Tensor | None
    generator: torch.Generator
    real_labels: Any = None

    @property
    def batch_size(self) -> int:
        return int(self.noise.shape[0])


class DistillMethod(torch.nn.Module, abc.ABC):
    """Base class of distillation methods (see the module docstring for the contract).

    Subclasses set :attr:`name`, register their trainable networks as submodules in ``__init__``,
    call :meth:`set_teacher` with the frozen teacher (a ``GuidedDenoiser`` or any callable), and
    implement :meth:`optimizer_groups`, :meth:`generator_loss`, :meth:`critic_loss` and
    :meth:`student`.

    Attributes:
        name: the method's key (``"dmd2"``, ``"fdistill"``, ...).
        needs_real_data: whether :attr:`Batch.real` must be filled (GAN term).
    """

    name: str = "base"
    needs_real_data: bool = False

    def set_teacher(self, teacher: Any) -> None:
        """Keep a reference to the frozen teacher without registering it as a submodule."""
        object.__setattr__(self, "_teacher", teacher)

    @property
    def teacher(self) -> Any:
        teacher = self.__dict__.get("_teacher")
        if teacher is None:
            raise RuntimeError(f"{type(self).__name__}: no teacher set; call set_teacher(teacher) first.")
        return teacher

    @abc.abstractmethod
    def optimizer_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """``{group name: trainable parameters}``; ``"generator"`` must be present."""

    @abc.abstractmethod
    def generator_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Loss of the generator (student) update; must contain a scalar ``"loss"``."""

    @abc.abstractmethod
    def critic_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Loss of the critic update (fake-score DSM, + GAN discriminator, + R1); ``"loss"`` required."""

    def forward(self, phase: str, batch: Batch) -> dict[str, torch.Tensor]:
        """``phase`` ``"generator"`` or ``"critic"``: the trainer calls the method through this forward so
        that DDP/FSDP wrappers (and accelerate's autocast) see one module call per micro-step."""
        if phase == "generator":
            return self.generator_loss(batch)
        if phase == "critic":
            return self.critic_loss(batch)
        raise ValueError(f"phase must be 'generator' or 'critic', got {phase!r}.")

    def trainer_state(self) -> dict:
        """Training state saved in the trainer's checkpoint (tensors or plain values); default none."""
        return {}

    def load_trainer_state(self, state: dict) -> None:
        """Restore what :meth:`trainer_state` returned."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no trainer state, got keys {sorted(state)}.")

    def begin_generator_step(self, step: int) -> None:
        """Called with the generator-step index before each generator step (DisBack's node schedule, MSD's
        active student); default nothing. Must depend on ``step`` only, so a resumed run does the same."""

    def observe_evaluation(self, step: int, metrics: Mapping[str, float]) -> None:
        """Called on every process after the evaluation at generator step ``step`` with its metrics (the same on
        every process: FID, accuracy, ...; DisBack's plateau switch); default nothing. What it changes must be
        trainer state, so a resumed run does the same."""

    @property
    def trains_critic(self) -> bool:
        """Whether this generator step's critic updates run (MSD's regression stage: not); default always.
        Must depend on the step only (set in :meth:`begin_generator_step`)."""
        return True

    @property
    def trains_generator(self) -> bool:
        """Whether this generator step's generator update runs (MSD's critic warm-up, DisBack's recording
        stage: not; the generator's schedule still advances, its EMA does not step); default always. Must
        depend on the step only (set in :meth:`begin_generator_step`)."""
        return True

    def learning_rate_scale(self, group: str) -> float:
        """Multiplier of optimiser group ``group``'s scheduled learning rate for the current generator step (MSD's
        TSM stage); default 1. Must depend on the step only (set in :meth:`begin_generator_step`)."""
        return 1.0

    def export_pipeline(self, teacher_pipeline) -> Any:
        """The pipeline to save as the run's ``student/`` folder, or ``None`` (default) for the trainer's
        :class:`~fastgen.pipelines.student.FastGenStudentPipeline` of :meth:`student_network`."""
        return None

    @abc.abstractmethod
    def student(self) -> torch.nn.Module:
        """The network saved as the student (and tracked by the EMA)."""

    @abc.abstractmethod
    def sample(self, noise: torch.Tensor, labels: Any) -> torch.Tensor:
        """Generate with the current student from ``noise`` (no gradient): in-training evaluation and grids."""
