"""DMD2: distribution matching distillation with a fake-score critic and a GAN head.

Yin et al., *One-step Diffusion with Distribution Matching Distillation* (DMD, arXiv:2311.18828) and
*Improved Distribution Matching Distillation for Fast Image Synthesis* (DMD2, arXiv:2405.14867).

Generator step (student ``G``, teacher denoiser ``mu_real`` with CFG, fake denoiser ``mu_fake``)::

    x0 = G(z);  t ~ U[dm_time];  x_t = alpha_t x0 + sigma_t eps
    grad = (mu_fake(x_t) - mu_real(x_t)) / mean|x0 - mu_real(x_t)|        # DMD's per-sample normaliser
    L_DM = 1/2 || x0 - sg(x0 - w * grad) ||^2                              # d L_DM / d x0 = w * grad
    L_G  = L_DM + gan_weight_generator * softplus(-D(alpha_t' x0 + sigma_t' eps'))

with an optional per-sample weight ``w`` (f-distill's ``h(r)``; DMD2 has none). Critic step: the fake
score learns the student's distribution by denoising score matching on *detached* student samples
(``t ~ U[dsm_time]``), and the discriminator head (on frozen-teacher features by default, or on the
fake score's, via forward hooks) the non-saturating logistic loss between noised real data and noised
student samples (``t ~ U[gan_time]``), plus optional approximate R1 (the logits of a noised real
sample and of that sample + ``r1_sigma`` noise should agree; spec correction 0.5).

Defaults follow the spec: DM times in ``[20, 980]``, DSM and GAN times in ``[0, 999]``; the critic
updates ``critic_steps_per_generator_step`` times per generator update (the trainer's option).
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, fields
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from ..denoiser import Denoiser, GuidedDenoiser
from ..guidance.base import is_linear_guider
from .discriminator import DiscriminatorHead, FeatureTap, default_feature_blocks
from .method import Batch, DistillMethod
from .students import (DEFAULT_ONE_STEP_TIMESTEP, Student, check_grad_space, check_renoise, check_step_draw,
                       null_class_label, split_conditions)

GAN_FEATURE_SOURCES = ("teacher", "fake_score")
FAKE_SCORE_LOSSES = ("model", "x0")
CRITIC_SAMPLES = ("step", "final")
LATER_STEP_TARGETS = ("dm", "teacher")


def dmd_gradient(x0: torch.Tensor, mu_real: torch.Tensor, mu_fake: torch.Tensor) -> torch.Tensor:
    """DMD's normalised score difference ``(mu_fake - mu_real) / mean|x0 - mu_real|`` (per sample, fp32)."""
    x0, mu_real, mu_fake = x0.detach().float(), mu_real.detach().float(), mu_fake.detach().float()
    dims = tuple(range(1, x0.ndim))
    norm = (x0 - mu_real).abs().mean(dim=dims, keepdim=True)
    return torch.nan_to_num((mu_fake - mu_real) / norm)


def dmd_loss(x0: torch.Tensor, mu_real: torch.Tensor, mu_fake: torch.Tensor, weight: torch.Tensor | None = None,
             reduction: str = "mean") -> torch.Tensor:
    """``1/2 ||x0 - sg(x0 - w * grad)||^2``: its gradient in ``x0`` is ``w * grad`` under ``"sum"``.

    ``weight`` (``[B]``, detached) scales each sample's gradient (f-distill's ``h``); ``None`` is DMD2.
    ``"mean"`` (DMD2's reduction) divides by the number of elements.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")
    grad = dmd_gradient(x0, mu_real, mu_fake)
    if weight is not None:
        grad = grad * weight.detach().float().reshape((-1,) + (1,) * (x0.ndim - 1))
    target = (x0.detach().float() - grad).detach()
    return 0.5 * F.mse_loss(x0.float(), target, reduction=reduction)


def cfg_x0(denoiser: Denoiser, x_t, t, cond, uncond, scale: torch.Tensor) -> torch.Tensor:
    """CFG's x0 with one scale per row: ``x0_u + scale (x0_c - x0_u)`` (the unconditional pass is skipped when
    every scale is 1). CFG is linear, so combining in x0 space equals combining the network's outputs."""
    if uncond is None:
        raise ValueError("dm_step_guidance needs an unconditional branch: set null_label (the teacher has no null "
                         "class).")
    x0_cond = denoiser.predict(x_t, t, cond)[0]
    if bool((scale == 1).all()):
        return x0_cond
    x0_uncond = denoiser.predict(x_t, t, uncond)[0]
    scale = scale.to(x0_cond.dtype).reshape((-1,) + (1,) * (x0_cond.ndim - 1))
    return x0_uncond + scale * (x0_cond - x0_uncond)


def _non_negative_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value >= 0


def _check_time_range(name: str, value) -> tuple[int, int]:
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) for v in value) or not 0 <= value[0] <= value[1]):
        raise ValueError(f"{name} must be a pair of integer timesteps (low, high) with 0 <= low <= high, got {value!r}.")
    return int(value[0]), int(value[1])


@dataclass
class DMD2Config:
    """DMD2 options (spec sections 0, 1.2, 1.3).

    Args:
        student_timesteps: the student's step list (``[500]``: one step at ``t* = 500``).
        student_renoise: a few-step student's re-noising between steps: ``"fresh"`` (DMD2) or ``"ddim"``
            (the step's own noise estimate; :class:`~.students.Student`).
        student_step_draw: which step of a few-step student a generator or critic turn trains on: one random step
            for the batch (``"batch"``, DMD2) or one per sample (``"sample"``; :class:`~.students.Student`).
        student_grad_space: where a few-step student's steps get loss gradients of equal scale: ``"x0"`` (DMD2)
            or the network's output (``"output"``: a low-noise step's gradient is scaled up by the ratio of
            ``|dx0/dout|`` at the first step to its own; :class:`~.students.Student`).
        dm_step_weights: a few-step student's DM-term weight at each of its steps (``None``: 1 at every step,
            DMD2). ``[1, 0]`` trains a 2-step student's last step by the GAN term alone: the DM term pulls towards
            the teacher's distribution, the GAN term towards the real data.
        dm_step_guidance: the teacher's CFG scale in the DM term at each student step (``None``: the teacher's
            own guidance at every step). ``[2, 1]``: a 2-step student's first step matches the guided teacher
            (class fidelity), its low-noise last step the unguided one. Guidance at low noise costs distribution
            quality (Kynkaenniemi et al. 2024, arXiv:2404.07724); on digits the unguided teacher's x0 at t = 100
            after a one-step student improves its FID, the CFG-2 teacher's worsens it. Needs a linear (CFG)
            teacher guidance or none, and an unconditional label.
        later_step_target: how a few-step student's later steps are trained: ``"dm"`` (DMD2: a random step per
            generator turn, trained by the DM and GAN terms like the first) or ``"teacher"`` (every generator turn
            trains step 0 by DM + GAN exactly as a one-step student, plus one random later step by regression to
            the teacher's x0 at that step's backward-simulated input, guided as ``dm_step_guidance`` says, weight
            ``later_step_weight``; the critics learn from step 0's outputs). On digits an unguided teacher step at
            t = 100 after a one-step student lowers its FID (``benchmarks/fewstep_refine.py``): ``"teacher"``
            makes the later steps learn that refinement.
        later_step_weight: weight of that regression (``later_step_target="teacher"``). The default, 10, puts its
            per-element gradient on the DM term's scale (an x0 MSE of ~1e-3 against a DMD-normalised DM loss of
            ~0.2); at 1 the later steps of the digits students drifted from the teacher's refinement (a 2-step
            student's own t = 100 step: FID 0.78 at step 2,000, the teacher's step on its first step's output: 0.62).
        critic_samples: what a few-step student's critic turn (fake score and discriminator) learns from: its
            x0 at a random step of the chain (``"step"``, DMD2: the critics model the mixture of every step's
            outputs) or its final output (``"final"``: the distribution the student generates).
        dm_time, dsm_time, gan_time: inclusive timestep ranges of the DM loss, the fake score's DSM
            loss and the GAN (both generator and discriminator terms).
        gan_weight_generator: weight of the generator's GAN term (0: no GAN term for the student).
        gan_weight_discriminator: weight of the discriminator loss in the critic step (0: no
            discriminator, no real data needed, i.e. plain DMD with TTUR).
        r1_weight, r1_sigma: approximate R1 on noised real inputs (0: off).
        gan_features: ``"teacher"`` (frozen teacher features, default) or ``"fake_score"`` (DMD2).
        feature_blocks: blocks read by the discriminator (default: the bottleneck).
        fake_score_loss: DSM target: ``"model"`` (the network's own parameterisation) or ``"x0"``.
        dm_loss_weight: weight of the DM term.
        lora_student, lora_fake_score: adapters on the one frozen teacher network instead of copies.
        lora_rank, lora_alpha, lora_target_modules: LoRA options.
        null_label: the unconditional class (default: from the network config).
        regression_weight: weight of DMD's regression term (DMD, arXiv:2311.18828, section 3.3; DMD2 drops it):
            the one-step student's output on fixed noises ``z_i`` regresses the teacher's deterministic guided
            sample from the same ``z_i`` (L2 in the data space; DMD uses LPIPS, which needs pretrained weights).
            0: off (DMD2). Class-conditional one-step students only.
        regression_pairs: number of fixed (noise, class, teacher sample) pairs, class ``i % C`` for pair ``i``.
        regression_steps: DDIM steps of the teacher's sampler that makes the pairs (2 NFE each with CFG).
        regression_seed: seed of the pairs' noises (one generator, drawn as a block: not the seeds of the
            in-training evaluation, which draws sample ``i`` from seed ``i``).
    """

    student_timesteps: Sequence[int] = (DEFAULT_ONE_STEP_TIMESTEP,)
    student_renoise: str = "fresh"
    student_step_draw: str = "batch"
    student_grad_space: str = "x0"
    dm_step_weights: Sequence[float] | None = None
    dm_step_guidance: Sequence[float] | None = None
    critic_samples: str = "step"
    later_step_target: str = "dm"
    later_step_weight: float = 10.0
    dm_time: tuple[int, int] = (20, 980)
    dsm_time: tuple[int, int] = (0, 999)
    gan_time: tuple[int, int] = (0, 999)
    gan_weight_generator: float = 1e-3
    gan_weight_discriminator: float = 1e-2
    r1_weight: float = 0.0
    r1_sigma: float = 0.1
    gan_features: str = "teacher"
    feature_blocks: Sequence[str] | None = None
    fake_score_loss: str = "model"
    dm_loss_weight: float = 1.0
    lora_student: bool = False
    lora_fake_score: bool = False
    lora_rank: int = 16
    lora_alpha: float | None = None
    lora_target_modules: Sequence[str] | None = None
    null_label: int | None = None
    regression_weight: float = 0.0
    regression_pairs: int = 1024
    regression_steps: int = 20
    regression_seed: int = 1_000_003

    def __post_init__(self):
        check_renoise(self.student_renoise, "student_renoise")
        check_step_draw(self.student_step_draw, "student_step_draw")
        check_grad_space(self.student_grad_space, "student_grad_space")
        timesteps = list(self.student_timesteps)
        if self.dm_step_weights is not None:
            w = self.dm_step_weights
            if (not isinstance(w, (list, tuple)) or len(w) != len(timesteps)
                    or not all(_non_negative_number(v) for v in w)):
                raise ValueError(f"dm_step_weights must be one non-negative number per student step ({len(timesteps)} "
                                 f"for student_timesteps {timesteps}), got {w!r}.")
            self.dm_step_weights = [float(v) for v in w]
        if self.dm_step_guidance is not None:
            w = self.dm_step_guidance
            if (not isinstance(w, (list, tuple)) or len(w) != len(timesteps)
                    or not all(_non_negative_number(v) and math.isfinite(v) for v in w)):
                raise ValueError(f"dm_step_guidance must be one finite guidance scale >= 0 per student step "
                                 f"({len(timesteps)} for student_timesteps {timesteps}), got {w!r}.")
            self.dm_step_guidance = [float(v) for v in w]
        if self.critic_samples not in CRITIC_SAMPLES:
            raise ValueError(f"critic_samples must be one of {CRITIC_SAMPLES}, got {self.critic_samples!r}.")
        if self.later_step_target not in LATER_STEP_TARGETS:
            raise ValueError(f"later_step_target must be one of {LATER_STEP_TARGETS}, got {self.later_step_target!r}.")
        if not (_non_negative_number(self.later_step_weight) and math.isfinite(self.later_step_weight)):
            raise ValueError(f"later_step_weight must be a finite number >= 0, got {self.later_step_weight!r}.")
        if self.later_step_target == "teacher":
            if len(timesteps) < 2:
                raise ValueError(f"later_step_target 'teacher' trains the later steps of a few-step student; "
                                 f"student_timesteps {timesteps} has one step.")
            if self.dm_step_weights is not None or self.critic_samples != "step":
                raise ValueError("later_step_target 'teacher' trains step 0 alone by the DM term and the critics on "
                                 "step 0's outputs: leave dm_step_weights unset and critic_samples 'step'.")
        for name in ("dm_time", "dsm_time", "gan_time"):
            setattr(self, name, _check_time_range(name, tuple(getattr(self, name))))
        for name in ("regression_pairs", "regression_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.regression_weight and len(timesteps) != 1:
            raise ValueError(f"regression_weight > 0 needs a one-step student (DMD's regression term), got "
                             f"student_timesteps {timesteps}.")
        for name in ("gan_weight_generator", "gan_weight_discriminator", "r1_weight", "r1_sigma", "dm_loss_weight",
                     "regression_weight"):
            value = getattr(self, name)
            if not _non_negative_number(value):
                raise ValueError(f"{name} must be a non-negative number, got {value!r}.")
        if self.gan_weight_generator > 0 and self.gan_weight_discriminator == 0:
            raise ValueError("gan_weight_generator > 0 needs a trained discriminator: set gan_weight_discriminator > 0.")
        if self.gan_features not in GAN_FEATURE_SOURCES:
            raise ValueError(f"gan_features must be one of {GAN_FEATURE_SOURCES}, got {self.gan_features!r}.")
        if self.fake_score_loss not in FAKE_SCORE_LOSSES:
            raise ValueError(f"fake_score_loss must be one of {FAKE_SCORE_LOSSES}, got {self.fake_score_loss!r}.")

    @property
    def use_gan(self) -> bool:
        return self.gan_weight_discriminator > 0


def _trainable_copy(network: torch.nn.Module) -> torch.nn.Module:
    """A float32 copy of the teacher network with gradients on, in train mode (student, fake score)."""
    return copy.deepcopy(network).float().requires_grad_(True).train()


@contextlib.contextmanager
def _no_param_grad(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Record a forward without gradients into ``params`` (gradients still flow to the inputs)."""
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


class DMD2(DistillMethod):
    """DMD2 (arXiv:2405.14867): one- or few-step student, fake-score critic, GAN head.

    Args:
        teacher: the teacher :class:`~fastgen.denoiser.Denoiser`, or a :class:`~fastgen.training.teacher.Teacher`
            bundle (its ``guided`` denoiser is used as is). The network is frozen and put in eval mode;
            student and fake score start as copies of it, or as LoRA adapters on it.
        guider: the teacher's guidance (e.g. ``fastgen.guidance.CFG(2.0)``), applied to the teacher only
            (with a ``Teacher`` bundle: overrides its guidance when given).
        config: :class:`DMD2Config`; keyword options override its fields.
    """

    name = "dmd2"
    config_class = DMD2Config

    def __init__(self, teacher: Denoiser, guider=None, config: DMD2Config | None = None, **options):
        super().__init__()
        config = config or self.config_class()
        if options:
            known = {f.name for f in fields(config)}
            unknown = sorted(set(options) - known)
            if unknown:
                raise TypeError(f"unknown {self.name} options {unknown}; accepted: {sorted(known)}.")
            config = type(config)(**{**{f.name: getattr(config, f.name) for f in fields(config)}, **options})
        self.config = config
        self.needs_real_data = config.use_gan
        if hasattr(teacher, "denoiser") and hasattr(teacher, "guided"):  # fastgen.training.teacher.Teacher
            bundle_null = getattr(teacher, "null_label", None)
            self.__dict__["teacher_bundle"] = teacher  # the pipeline (DMD's regression pairs)
            guided = teacher.guided if guider is None else GuidedDenoiser(teacher.denoiser, guider=guider)
            teacher = teacher.denoiser
        else:
            bundle_null, guided = None, GuidedDenoiser(teacher, guider=guider)
        if config.dm_step_guidance is not None and guided.guider is not None and not is_linear_guider(guided.guider):
            raise ValueError(f"dm_step_guidance sets a CFG scale per student step; the teacher's guidance "
                             f"{type(guided.guider).__name__} is not CFG. Use guidance cfg or none.")
        network = teacher.model
        network.requires_grad_(False).eval()
        schedule, prediction_type = teacher.schedule, teacher.prediction_type
        self.__dict__["teacher_denoiser"] = teacher
        self.set_teacher(guided)
        self.null_label = next((v for v in (config.null_label, bundle_null, null_class_label(network)) if v is not None),
                               None)
        self._lora = config.lora_student or config.lora_fake_score
        lora_kwargs = dict(rank=config.lora_rank, alpha=config.lora_alpha, target_modules=config.lora_target_modules)
        from . import lora

        # Student: a copy of the teacher, or adapter "student" on the teacher's network.
        if config.lora_student:
            lora.add_lora(network, "student", **lora_kwargs)
            self.student_module = Student(network, schedule, prediction_type, config.student_timesteps, adapter="student",
                                          renoise=config.student_renoise, step_draw=config.student_step_draw,
                                          grad_space=config.student_grad_space)
        else:
            self.student_module = Student(_trainable_copy(network), schedule, prediction_type,
                                          config.student_timesteps, renoise=config.student_renoise,
                                          step_draw=config.student_step_draw, grad_space=config.student_grad_space)
        # Fake score: a copy of the teacher, or adapter "fake_score" on the same network.
        if config.lora_fake_score:
            self._fake_params = lora.add_lora(network, "fake_score", **lora_kwargs)
            fake_network, self._fake_adapter = network, "fake_score"
            if not config.lora_student:
                self.base = network  # register the shared base (and its adapters) once
        else:
            fake_network, self._fake_adapter = _trainable_copy(network), None
            self.fake_network = fake_network
            self._fake_params = list(fake_network.parameters())
        if config.lora_student:
            self._student_params = lora.adapter_parameters(network, "student")
        else:
            self._student_params = list(self.student_module.network.parameters())
        fake_den = Denoiser(fake_network, schedule, prediction_type)
        self.__dict__["fake_denoiser"] = fake_den
        self.__dict__["fake_score"] = GuidedDenoiser(fake_den)
        # Discriminator head on teacher (default) or fake-score features.
        if config.use_gan:
            source = network if config.gan_features == "teacher" else fake_network
            blocks = list(config.feature_blocks or default_feature_blocks(source))
            self.discriminator = DiscriminatorHead.for_network(source, blocks)
            self.__dict__["tap"] = FeatureTap(source, blocks)

    def train(self, mode: bool = True) -> "DMD2":
        super().train(mode)
        if self._lora:  # the shared base is the frozen teacher: always in eval mode
            self.teacher_denoiser.model.eval()
        return self

    # ------------------------------------------------------------------ contract
    def optimizer_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        groups = {"generator": list(self._student_params), "critic": list(self._fake_params)}
        if self.config.use_gan:
            groups["discriminator"] = list(self.discriminator.parameters())
        return groups

    def student(self) -> Student:
        return self.student_module

    def student_network(self) -> torch.nn.Module:
        """The student's weights as a plain teacher-architecture network (LoRA merged), for export."""
        if self.config.lora_student:
            from .lora import merged_copy

            return merged_copy(self.student_module.network, "student")
        return self.student_module.network

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, labels: Any, generator=None) -> torch.Tensor:
        cond, _ = split_conditions(labels, self.null_label)
        return self.student_module.sample(noise, cond, generator)

    # ------------------------------------------------------------------ building blocks
    def _adapter(self, name: str | None):
        if not self._lora:
            return contextlib.nullcontext()
        from .lora import use_adapter

        return use_adapter(self.teacher_denoiser.model, name)

    def _teacher_x0(self, x_t, t, cond, uncond, scale: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher's x0, guided as configured, or with CFG scale ``scale`` (one per row) when given."""
        with torch.no_grad(), self._adapter(None):
            if scale is None:
                return self.teacher(x_t, t, cond=cond, uncond=uncond).x0
            return cfg_x0(self.teacher_denoiser, x_t, t, cond, uncond, scale)

    def _fake_prediction(self, x_t, t, cond):
        with self._adapter(self._fake_adapter):
            return self.fake_score(x_t, t, cond=cond)

    def _logits(self, x_t, t, cond, *, backbone_grad: bool) -> torch.Tensor:
        """Discriminator logits at ``(x_t, t)``; ``backbone_grad``: let the GAN loss train the fake score."""
        if self.config.gan_features == "teacher":
            den, adapter, params = self.teacher_denoiser, None, []
        else:
            den, adapter, params = self.fake_denoiser, self._fake_adapter, ([] if backbone_grad else self._fake_params)
        with self._adapter(adapter), _no_param_grad(params):
            features = self.tap.run(den, x_t, t, cond)  # the forward stops after the last tapped block
        return self.discriminator(features)

    @staticmethod
    def _timesteps(time_range: tuple[int, int], n: int, generator: torch.Generator, device) -> torch.Tensor:
        low, high = time_range
        t = torch.randint(low, high + 1, (n,), generator=generator, device=generator.device)
        return t.to(device)

    def _noised(self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        eps = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        a, s = self.teacher_denoiser.alpha_sigma(t, like=x0)
        return a * x0 + s * eps

    def _conditions(self, labels):
        return split_conditions(labels, self.null_label)

    def dm_weight(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> tuple[torch.Tensor | None, dict]:
        """Per-sample weight of the DM gradient (``None``: unweighted DMD2) and values to log."""
        return None, {}

    @torch.no_grad()
    def regression_pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """DMD's paired set (arXiv:2311.18828, section 3.3): ``(noise [P, ...], classes [P], teacher samples)``.

        Pair ``i``: noise from one generator seeded ``regression_seed`` (drawn as a block), class ``i % C``, and
        the teacher pipeline's own deterministic sample from that noise (its scheduler, ``regression_steps``
        steps, the teacher's guidance). Made once, on first use: the same on every process and after a resume.
        """
        pairs = self.__dict__.get("_regression_pairs")
        if pairs is None:
            c, bundle = self.config, self.__dict__.get("teacher_bundle")
            if bundle is None or bundle.num_classes is None:
                raise ValueError("regression_weight > 0 needs a class-conditional teacher pipeline (a Teacher bundle "
                                 "from fastgen.training.teacher.load_teacher).")
            g = torch.Generator().manual_seed(c.regression_seed)
            noise = torch.randn(c.regression_pairs, *bundle.sample_shape, generator=g)
            labels = torch.arange(c.regression_pairs) % int(bundle.num_classes)
            device = next(self.teacher_denoiser.model.parameters()).device
            out = []
            bundle.pipeline.set_progress_bar_config(disable=True)
            for rows in torch.split(torch.arange(c.regression_pairs), 256):
                out.append(bundle.pipeline(class_labels=labels[rows].tolist(), latents=noise[rows].to(device),
                                           num_inference_steps=c.regression_steps, guidance=self.teacher.guider,
                                           guidance_scale=float(bundle.guidance_scale),
                                           output_type="latent").images.float().cpu())
            pairs = self.__dict__["_regression_pairs"] = (noise, labels, torch.cat(out))
        return pairs

    def regression_loss(self, n: int, generator: torch.Generator, device) -> torch.Tensor:
        """Mean squared error between the student's output on ``n`` random pairs' noises and the teacher's samples."""
        noise, labels, target = self.regression_pairs()
        idx = torch.randint(noise.shape[0], (n,), generator=generator, device=generator.device).cpu()
        cond, _ = self._conditions(labels[idx].to(device))
        pred = self.student_module(noise[idx].to(device), cond, generator, step=0)
        return F.mse_loss(pred.float(), target[idx].to(device).float())

    def later_step_loss(self, noise: torch.Tensor, cond, uncond, generator: torch.Generator) -> torch.Tensor:
        """``later_step_target="teacher"``: mean squared difference between the student's x0 at one random later
        step ``k >= 1`` (input by backward simulation) and the teacher's x0 at that input (CFG scale
        ``dm_step_guidance[k]`` when set, else the teacher's guidance)."""
        student = self.student_module
        k = 1 + int(torch.randint(student.num_steps - 1, (1,), generator=generator, device=generator.device))
        x_k = student.input_of(k, noise, cond, generator)
        pred = student.denoise(x_k, k, cond)
        t = torch.full((noise.shape[0],), student.timesteps[k], device=noise.device, dtype=torch.long)
        scale = None
        if self.config.dm_step_guidance is not None:
            scale = torch.full((noise.shape[0],), self.config.dm_step_guidance[k], device=noise.device)
        target = self._teacher_x0(x_k, t, cond, uncond, scale)
        return F.mse_loss(pred.float(), target.float())

    # ------------------------------------------------------------------ losses
    def generator_loss(self, batch: Batch, student=None) -> dict[str, torch.Tensor]:
        """DM (+ GAN, + regression) loss of ``student`` (default: this method's own; MSD passes its router)."""
        c, g = self.config, batch.generator
        cond, uncond = self._conditions(batch.labels)
        teacher_target = c.later_step_target == "teacher"
        if teacher_target and student is not None:
            raise ValueError("later_step_target 'teacher' needs the method's own student (not MSD's shared-critic "
                             "router).")
        if teacher_target:  # the DM and GAN terms train step 0 only
            step = 0
        elif c.dm_step_weights is not None or c.dm_step_guidance is not None:
            # The step is drawn here (as the student would) only when the DM term depends on it.
            step = self.student_module.draw_step(batch.noise.shape[0], g)
        else:
            step = None
        x0 = (student or self.student_module)(batch.noise, cond, g, step=step)
        t = self._timesteps(c.dm_time, x0.shape[0], g, x0.device)
        x_t = self._noised(x0.detach(), t, g)
        scale = None
        if c.dm_step_guidance is not None:
            scale = torch.tensor(c.dm_step_guidance, device=x0.device)[step].expand(x0.shape[0])
        with torch.no_grad():
            mu_real = self._teacher_x0(x_t, t, cond, uncond, scale)
            mu_fake = self._fake_prediction(x_t, t, cond).x0
        weight, logs = self.dm_weight(x_t, t, cond)
        if c.dm_step_weights is not None:
            w_step = torch.tensor(c.dm_step_weights, device=x0.device)[step]
            w_step = w_step.expand(x0.shape[0]) if w_step.ndim == 0 else w_step
            weight = w_step if weight is None else weight * w_step
        loss_dm = dmd_loss(x0, mu_real, mu_fake, weight)
        out = {"dm": loss_dm.detach(), **logs}
        loss = c.dm_loss_weight * loss_dm
        if c.use_gan and c.gan_weight_generator > 0:
            t_gan = self._timesteps(c.gan_time, x0.shape[0], g, x0.device)
            logits = self._logits(self._noised(x0, t_gan, g), t_gan, cond, backbone_grad=False)
            loss_gan = F.softplus(-logits).mean()
            loss = loss + c.gan_weight_generator * loss_gan
            out["gan"] = loss_gan.detach()
        if teacher_target:
            loss_later = self.later_step_loss(batch.noise, cond, uncond, g)
            loss = loss + c.later_step_weight * loss_later
            out["later_step"] = loss_later.detach()
        if c.regression_weight > 0:
            loss_reg = self.regression_loss(x0.shape[0], g, x0.device)
            loss = loss + c.regression_weight * loss_reg
            out["regression"] = loss_reg.detach()
        out["loss"] = loss
        return out

    def critic_loss(self, batch: Batch, student=None) -> dict[str, torch.Tensor]:
        """Fake-score DSM (+ discriminator) loss on samples of ``student`` (default: this method's own)."""
        c, g = self.config, batch.generator
        cond, uncond = self._conditions(batch.labels)
        last = self.student_module.num_steps - 1 if c.critic_samples == "final" else None
        if c.later_step_target == "teacher":
            last = 0  # the DM term trains step 0 alone: the critics model its outputs
        with torch.no_grad():
            x0 = (student or self.student_module)(batch.noise, cond, g, step=last).detach()
        loss_dsm = self.dsm_loss(x0, cond, uncond, g)
        out = {"dsm": loss_dsm.detach()}
        loss = loss_dsm
        if self.critic_trains_discriminator:
            loss_gan, logged = self.discriminator_loss(x0, cond, batch)
            loss = loss + loss_gan
            out.update(logged)
        out["loss"] = loss
        return out

    @property
    def critic_trains_discriminator(self) -> bool:
        """Whether the critic phase trains the GAN discriminator head too."""
        return self.config.use_gan

    def dsm_loss(self, x0: torch.Tensor, cond, uncond, g: torch.Generator) -> torch.Tensor:
        """Denoising score matching of the fake score on detached student samples ``x0``."""
        c = self.config
        t = self._timesteps(c.dsm_time, x0.shape[0], g, x0.device)
        x_t = self._noised(x0, t, g)
        pred = self._fake_prediction(x_t, t, cond)
        if c.fake_score_loss == "x0":
            return F.mse_loss(pred.x0.float(), x0.float())
        return F.mse_loss(pred.model_output.float(), self.fake_denoiser.from_x0(x0, x_t, t).float())

    def discriminator_loss(self, x0: torch.Tensor, cond, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The GAN critic's loss (weighted, R1 included) on detached samples ``x0`` against ``batch.real``, and the
        values to log."""
        c, g = self.config, batch.generator
        if batch.real is None:
            raise ValueError(f"{self.name} with a GAN term needs real data: Batch.real is None.")
        real = batch.real.to(x0.device, x0.dtype)
        real_cond = self._conditions(batch.real_labels)[0] if batch.real_labels is not None else cond
        grad = c.gan_features == "fake_score"
        t_real = self._timesteps(c.gan_time, real.shape[0], g, x0.device)
        x_real = self._noised(real, t_real, g)
        t_fake = self._timesteps(c.gan_time, x0.shape[0], g, x0.device)
        x_fake = self._noised(x0, t_fake, g)
        logits_real = self._logits(x_real, t_real, real_cond, backbone_grad=grad)
        logits_fake = self._logits(x_fake, t_fake, cond, backbone_grad=grad)
        loss_d = F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()
        loss = c.gan_weight_discriminator * loss_d
        out = {"disc": loss_d.detach(), "logit_real": logits_real.detach().mean(),
               "logit_fake": logits_fake.detach().mean()}
        if c.r1_weight > 0:
            x_pert = x_real + c.r1_sigma * randn_tensor(x_real.shape, generator=g, device=x_real.device,
                                                        dtype=x_real.dtype)
            logits_pert = self._logits(x_pert, t_real, real_cond, backbone_grad=grad)
            loss_r1 = (logits_real - logits_pert).pow(2).mean()
            loss = loss + c.r1_weight * loss_r1
            out["r1"] = loss_r1.detach()
        return loss, out
