"""Distillation recipes: one dataclass (:class:`DistillConfig`) shared by YAML files, the command line
and Python, validated up front.

Flag names follow diffusers' training examples (``output_dir``, ``resume_from_checkpoint``,
``checkpointing_steps``, ``checkpoints_total_limit``, ``mixed_precision``,
``gradient_accumulation_steps``, ``learning_rate``, ``train_batch_size``, ``max_train_steps``,
``seed``). Every iteration budget counts **generator steps** (spec §0.2): one generator step is
``critic_steps_per_generator_step`` critic updates followed by one generator update, so a run does
``max_train_steps * (critic_steps_per_generator_step + 1)`` optimiser updates in all.

A recipe is a YAML mapping of field names (``distill/digits-dmd2.yaml``) read by ``fastgen distill
--config`` (:mod:`fastgen.cli.distill`); command-line flags override it:
``fastgen distill --config distill/digits-dmd2.yaml --max-train-steps 200``.
:meth:`DistillConfig.validate` raises one ``ValueError`` naming the field for every kind of bad input
(unknown method or divergence, missing teacher folder, a global batch that does not split over
processes x accumulation, non-positive steps or learning rates, ...) before any model is loaded.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Method key -> "module:class" (imported only when the method is built).
# The one-step student's timestep t* when none is given. A one-step student reads pure noise as x_t* and
# its epsilon output as x0 = (x_t - sigma eps) / alpha, which amplifies epsilon errors by 1/alpha: on the
# digits teacher's linear betas 150x at t = 999 (diverged), 12x at 700 (grainy students, roughness 0.15),
# 3.5x at 500, where the untrained student already scores FID 22 against 50 at 700 (500 fixed seeds).
# DMD2's SDXL student likewise runs at t = 399; SD-1.5 DMD students use 999.
DEFAULT_ONE_STEP_TIMESTEP = 500
# How a few-step student makes its next input from x0 (fastgen.training.students.Student): fresh noise (DMD2,
# LCMScheduler) or the step's own noise estimate (DDIM, eta = 0).
RENOISE_MODES = ("fresh", "ddim")
# How backward simulation picks the step a few-step student trains on: one step for the whole batch (DMD2's
# generator turn) or one per sample (DMD2's per-sample draw of its denoising data).
STEP_DRAWS = ("batch", "sample")
# Where a few-step student's steps get loss gradients of equal scale: in x0 (DMD2: the loss reads each step's x0
# as it is) or in the network's output (each step's x0 gradient times |dx0/dout| at the first step over its own;
# for epsilon prediction sigma/alpha, 3.4 at t = 500 and 0.078 at t = 20 on the digits teacher's linear betas).
GRAD_SPACES = ("x0", "output")

METHODS = {
    "dmd2": "fastgen.training.dmd2:DMD2",
    "fdistill": "fastgen.training.f_distill:FDistill",
    "agd": "fastgen.training.agd:AGD",  # adapter guidance distillation (issue 13)
    "disback": "fastgen.training.disback:DisBack",
    "msd": "fastgen.training.msd:MSD",
}
# Flags for the method options varied most, under the names of the method papers and issue 12 (``--base-method``,
# ``--nodes``, ``--interval``, ``--advance``, ``--students``, ``--train-student``): each is a field of the listed
# methods' configs and, when given, overrides that one key of ``method_options`` (a recipe's other options stay).
METHOD_FLAGS = {"base_method": ("disback", "msd"), "nodes": ("disback",), "interval": ("disback",),
                "advance": ("disback",), "students": ("msd",), "train_student": ("msd",)}
GUIDANCES = ("cfg", "apg", "none")
MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")
REPORT_TO = ("auto", "tensorboard", "none")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def divergences() -> tuple[str, ...]:
    """The f-divergence keys of f-distill (owned by :mod:`fastgen.training.divergences`)."""
    try:
        from .divergences import DIVERGENCES
    except ImportError:  # f-distill not built yet: the spec's table (distillation.md §2.2)
        return ("rkl", "kl", "js", "sh", "jf", "sf", "neyman")
    return tuple(DIVERGENCES)


@dataclass
class DistillConfig:
    """A distillation run. Budgets (``max_train_steps``, ``checkpointing_steps``, ``validation_steps``,
    ``logging_steps``, ``lr_warmup_steps``) count generator steps."""

    # --- what to distil
    method: str = field(default="dmd2", metadata={"help": f"distillation method: {', '.join(METHODS)}"})
    divergence: str = field(default="js", metadata={"help": "f-divergence of fdistill (rkl = DMD2, kl, js, sh, jf, sf, neyman)"})
    teacher: str = field(default="builtin:digits", metadata={"help": "builtin:<name> or a diffusers pipeline folder"})
    guidance: str = field(default="cfg", metadata={"help": "teacher guidance: cfg, apg or none (teacher only)"})
    guidance_scale: float = field(default=2.0, metadata={"help": "teacher CFG/APG scale w (mu_c + (w-1)(mu_c - mu_u))"})
    apg_eta: float = field(default=0.0, metadata={"help": "APG parallel-component weight"})
    apg_norm_threshold: float = field(default=15.0, metadata={"help": "APG norm threshold (0 = off)"})
    apg_momentum: float = field(default=0.0, metadata={"help": "APG momentum (0 = off; no run state in training)"})
    student_timesteps: list[int] = field(default_factory=lambda: [DEFAULT_ONE_STEP_TIMESTEP], metadata={
        "help": "student timesteps t*: one value = one-step student, several (descending) = few-step student"})
    student_renoise: str = field(default="fresh", metadata={
        "help": "few-step students: the next step's input is x0 re-noised with fresh noise (fresh: DMD2, "
                "LCMScheduler) or with the step's own noise estimate (ddim: DDIM eta=0, a deterministic chain)"})
    dataset: str = field(default="auto", metadata={
        "help": "real data for the GAN term: auto (the teacher's training split for builtin:digits), none, "
                "builtin:digits, a folder of images, or a .safetensors file/folder of latents"})
    prompts: str | None = field(default=None, metadata={
        "help": "text-to-image teachers: a text file with one training prompt per line"})
    resolution: int | None = field(default=None, metadata={"help": "image size of a folder dataset (default: the teacher's)"})
    method_options: str | None = field(default=None, metadata={
        "help": "JSON object of extra method arguments (e.g. '{\"gan_weight_generator\": 0.003}'); a mapping in YAML"})
    base_method: str | None = field(default=None, metadata={
        "help": "disback, msd: the distribution-matching method underneath, dmd2 or fdistill (sets that key of "
                "method_options; default: the recipe's, else dmd2)"})
    nodes: int | None = field(default=None, metadata={
        "help": "disback: N degradation nodes recorded in stage 1 (sets that key of method_options)"})
    interval: int | None = field(default=None, metadata={
        "help": "disback: stage-2 generator steps on each node before backtracking to the next (sets that key of "
                "method_options)"})
    advance: str | None = field(default=None, metadata={
        "help": "disback: when stage 2 moves to the next node: interval (every --interval steps) or plateau (also "
                "once the in-training FID stops improving on the node; needs --validation_steps) (sets that key of "
                "method_options)"})
    students: int | None = field(default=None, metadata={
        "help": "msd: K students, one per part of the condition space (sets that key of method_options)"})
    train_student: int | None = field(default=None, metadata={
        "help": "msd: train student k only, one of K independent runs (each on its own accelerate processes); "
                "join them with fastgen distill merge-msd (sets that key of method_options)"})

    # --- output, checkpoints, resume
    output_dir: str = field(default="runs/distill", metadata={"help": "run folder (checkpoints, logs, samples, student)"})
    checkpointing_steps: int = field(default=500, metadata={"help": "save a checkpoint every N generator steps"})
    checkpoints_total_limit: int | None = field(default=None, metadata={"help": "keep at most this many checkpoints"})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint folder"})

    # --- optimisation
    seed: int = field(default=0, metadata={"help": "trainer seed (data order, noise, times, per-rank streams)"})
    train_batch_size: int = field(default=32, metadata={"help": "GLOBAL batch per update (all processes x accumulation)"})
    max_train_steps: int = field(default=1000, metadata={"help": "number of generator steps"})
    critic_steps_per_generator_step: int = field(default=5, metadata={
        "help": "critic (fake score + discriminator) updates before each generator update (DMD2: 5)"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per update"})
    learning_rate: float = field(default=1e-4, metadata={"help": "generator learning rate"})
    learning_rate_critic: float | None = field(default=None, metadata={"help": "critic learning rate (default: learning_rate)"})
    learning_rate_discriminator: float | None = field(default=None, metadata={
        "help": "discriminator-head learning rate (default: learning_rate_critic); f-distill's density ratio comes "
                "from this head, so it must learn faster than the fake score on short runs"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    adam_weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (DMD2: 0.01)"})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    lr_scheduler: str = field(default="constant_with_warmup", metadata={"help": f"one of {', '.join(LR_SCHEDULERS)}"})
    lr_warmup_steps: int = field(default=0, metadata={"help": "warm-up in generator steps (critic: x critic steps)"})
    max_grad_norm: float = field(default=10.0, metadata={"help": "gradient-norm clipping per network group (0 = off)"})
    mixed_precision: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, no on CPU), no, fp16, bf16"})
    use_ema: bool = field(default=True, metadata={"help": "keep an EMA of the student (exported as the student)"})
    ema_decay: float = field(default=0.999, metadata={
        "help": "EMA decay (diffusers EMAModel caps it at (1+s)/(10+s) after s EMA steps, 0.978 at s = 400: a "
                "higher decay only acts in longer runs)"})
    ema_update_after_step: int = field(default=0, metadata={"help": "start the EMA after this many generator steps"})

    # --- evaluation and logging
    validation_steps: int = field(default=0, metadata={"help": "evaluate (FID, accuracy) and write a grid every N steps (0 = off)"})
    num_validation_samples: int = field(default=500, metadata={"help": "samples per evaluation (fixed seeds)"})
    validation_seed: int = field(default=0, metadata={"help": "sample i of an evaluation uses seed validation_seed + i"})
    validation_batch_size: int = field(default=250, metadata={"help": "samples per generation batch in evaluations"})
    logging_steps: int = field(default=10, metadata={"help": "log losses (JSONL, trackers, progress bar) every N steps"})
    report_to: str = field(default="auto", metadata={"help": "trackers: auto (tensorboard when installed), tensorboard, none"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self):
        if isinstance(self.student_timesteps, int):
            self.student_timesteps = [self.student_timesteps]

    # ------------------------------------------------------------------ helpers
    @property
    def num_critic_updates(self) -> int:
        return self.max_train_steps * self.critic_steps_per_generator_step

    def method_kwargs(self) -> dict[str, Any]:
        """``method_options`` as a dict (JSON string on the command line, mapping in YAML)."""
        value = self.method_options
        if value is None or value == "":
            return {}
        if isinstance(value, dict):
            return dict(value)
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"method_options must be a JSON object, got {value!r} ({err}).") from None
        if not isinstance(parsed, dict):
            raise ValueError(f"method_options must be a JSON object, got {value!r}.")
        return parsed

    def method_class(self):
        """The method's class (``METHODS[method]``, imported)."""
        import importlib

        module_name, cls_name = METHODS[self.method].split(":")
        return getattr(importlib.import_module(module_name), cls_name)

    def group_learning_rate(self, group: str) -> float:
        """The learning rate of an optimiser group: ``"generator"``, ``"discriminator"`` or a critic group."""
        critic = self.learning_rate_critic or self.learning_rate
        if group == "generator":
            return self.learning_rate
        if group == "discriminator":
            return self.learning_rate_discriminator or critic
        return critic

    def method_config(self):
        """The method's own config (``cls.config_class``: DMD2Config, FDistillConfig) from the shared fields
        (``student_timesteps``, ``divergence``), ``method_options`` and the method flags given
        (:data:`METHOD_FLAGS`, which win over ``method_options``); validated by its constructor."""
        cls = self.method_class()
        config_cls = getattr(cls, "config_class", None)
        options = self.method_kwargs()
        if config_cls is None:
            return options
        names = {f.name for f in dataclasses.fields(config_cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(f"method_options: {self.method} does not accept {unknown}; accepted: {sorted(names)}.")
        shared = {name: getattr(self, name) for name in ("student_timesteps", "student_renoise", "divergence", "output_dir")
                  if name in names}
        flags = {name: getattr(self, name) for name in METHOD_FLAGS if getattr(self, name) is not None}
        kwargs = {**shared, **options, **flags}
        for key, value in kwargs.items():  # YAML/JSON lists -> the tuples the method configs use
            if isinstance(value, list) and key.endswith("_time"):
                kwargs[key] = tuple(value)
        try:
            return config_cls(**kwargs)
        except (ValueError, TypeError) as err:
            if str(err).split(" ", 1)[0] in flags:  # a flag's own value: the message names it already
                raise ValueError(str(err)) from None
            raise ValueError(f"method_options ({self.method}): {err}") from None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if isinstance(out["method_options"], dict):
            out["method_options"] = json.dumps(out["method_options"], sort_keys=True)
        return out

    # ------------------------------------------------------------------ validation
    def validate(self, num_processes: int = 1, *, check_paths: bool = True) -> "DistillConfig":
        """Raise one ``ValueError``/``FileNotFoundError`` naming the first bad field; return ``self``."""
        def bad(name: str, msg: str):
            raise ValueError(f"{name}: {msg} (got {getattr(self, name)!r}).")

        def positive_int(name: str, allow_zero: bool = False, allow_none: bool = False):
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
                bad(name, "must be a " + ("non-negative" if allow_zero else "positive") + " integer")

        def number(name: str, low: float | None = None, high: float | None = None, strict_low: bool = False,
                   allow_none: bool = False):
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                bad(name, "must be a number")
            if low is not None and (value <= low if strict_low else value < low):
                bad(name, f"must be {'>' if strict_low else '>='} {low}")
            if high is not None and value > high:
                bad(name, f"must be <= {high}")

        if self.method not in METHODS:
            bad("method", f"unknown method; accepted: {', '.join(METHODS)}")
        if self.method == "fdistill" and self.divergence not in divergences():
            bad("divergence", f"unknown divergence; accepted: {', '.join(divergences())}")
        if self.guidance not in GUIDANCES:
            bad("guidance", f"accepted: {', '.join(GUIDANCES)}")
        number("guidance_scale", low=0.0)
        if self.mixed_precision not in MIXED_PRECISIONS:
            bad("mixed_precision", f"accepted: {', '.join(MIXED_PRECISIONS)}")
        if self.report_to not in REPORT_TO:
            bad("report_to", f"accepted: {', '.join(REPORT_TO)}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            bad("lr_scheduler", f"accepted: {', '.join(LR_SCHEDULERS)}")
        for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps",
                     "critic_steps_per_generator_step", "checkpointing_steps", "logging_steps",
                     "num_validation_samples", "validation_batch_size"):
            positive_int(name)
        for name in ("validation_steps", "lr_warmup_steps", "ema_update_after_step"):
            positive_int(name, allow_zero=True)
        positive_int("checkpoints_total_limit", allow_none=True)
        for name in ("seed", "validation_seed"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                bad(name, "must be a non-negative integer")
        number("learning_rate", low=0.0, strict_low=True)
        number("learning_rate_critic", low=0.0, strict_low=True, allow_none=True)
        number("learning_rate_discriminator", low=0.0, strict_low=True, allow_none=True)
        number("adam_beta1", low=0.0, high=1.0)
        number("adam_beta2", low=0.0, high=1.0)
        number("adam_weight_decay", low=0.0)
        number("adam_epsilon", low=0.0, strict_low=True)
        number("max_grad_norm", low=0.0)
        number("ema_decay", low=0.0, high=1.0)
        if (not isinstance(self.student_timesteps, (list, tuple)) or not self.student_timesteps
                or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.student_timesteps)
                or list(self.student_timesteps) != sorted(set(self.student_timesteps), reverse=True)):
            bad("student_timesteps", "must be a non-empty list of distinct non-negative integers in descending order")
        if self.student_renoise not in RENOISE_MODES:
            bad("student_renoise", f"accepted: {', '.join(RENOISE_MODES)}")
        for name, methods in METHOD_FLAGS.items():
            if getattr(self, name) is not None and self.method not in methods:
                bad(name, f"applies to --method {' or '.join(methods)} only, not {self.method}")
        method_config = self.method_config()  # unknown or bad method options fail here, before any model loads
        if self.validation_steps and not getattr(method_config, "serves_every_condition", True):
            bad("validation_steps", "a train_student run holds one part's student and in-training evaluation samples "
                                    "every class: set 0, and evaluate the joined pipeline (fastgen distill merge-msd)")
        if getattr(method_config, "needs_fid", False):  # DisBack's advance: plateau reads in-training FIDs
            if not self.validation_steps:
                bad("validation_steps", "advance 'plateau' reads the in-training FID: must be > 0")
            if self.teacher != "builtin:digits":
                bad("teacher", "advance 'plateau' reads the in-training FID, which the trainer computes for "
                               "builtin:digits only; use advance 'interval'")
        if not isinstance(num_processes, int) or num_processes < 1:
            raise ValueError(f"num_processes must be a positive integer, got {num_processes!r}.")
        per_update = num_processes * self.gradient_accumulation_steps
        if self.train_batch_size % per_update:
            bad("train_batch_size", f"the global batch must divide by processes ({num_processes}) x "
                                    f"gradient_accumulation_steps ({self.gradient_accumulation_steps}) = {per_update}")
        if not self.output_dir:
            bad("output_dir", "must be a folder path")
        if check_paths:
            self._check_paths()
        return self

    def _check_paths(self) -> None:
        teacher = self.teacher
        if teacher.startswith("builtin:"):
            from ..builtin import available_builtins
            if teacher.split(":", 1)[1] not in available_builtins():
                raise ValueError(f"teacher: unknown built-in {teacher!r}; accepted: "
                                 f"{', '.join('builtin:' + n for n in available_builtins())} or a pipeline folder.")
        elif not (Path(teacher) / "model_index.json").is_file():
            raise FileNotFoundError(f"teacher: {teacher!r} is not a diffusers pipeline folder (no model_index.json); "
                                    f"pass builtin:digits or a folder saved with save_pretrained.")
        # the student must fit the teacher: its timesteps inside the teacher's training schedule (read from the
        # scheduler config file, no model load)
        folder = Path(teacher)
        if teacher.startswith("builtin:"):
            from ..builtin import builtin_path
            folder = builtin_path(teacher.split(":", 1)[1])
        sched = folder / "scheduler" / "scheduler_config.json"
        if sched.is_file():
            steps = int(json.loads(sched.read_text()).get("num_train_timesteps", 1000))
            if max(self.student_timesteps) >= steps:
                raise ValueError(f"student_timesteps: {self.student_timesteps} do not fit the teacher {teacher!r}, whose "
                                 f"schedule has timesteps 0..{steps - 1}.")
        if self.prompts is not None and not Path(self.prompts).is_file():
            raise FileNotFoundError(f"prompts: {self.prompts!r} is not a file (one prompt per line).")
        if not teacher.startswith("builtin:") and self.prompts is None:
            name = json.loads((Path(teacher) / "model_index.json").read_text()).get("_class_name", "")
            name = name[-1] if isinstance(name, list) else str(name)
            if "StableDiffusion" in name:
                raise ValueError(f"prompts: the teacher {teacher!r} is text-to-image ({name}); pass a prompt file "
                                 f"(one prompt per line) with --prompts.")
        data = self.dataset
        if data not in ("auto", "none") and not data.startswith("builtin:") and not Path(data).exists():
            raise FileNotFoundError(f"dataset: {data!r} does not exist; pass auto, none, builtin:digits, a folder of "
                                    f"images or a .safetensors file/folder of latents.")
        if data.startswith("builtin:") and data != "builtin:digits":
            raise ValueError(f"dataset: unknown built-in dataset {data!r}; accepted: builtin:digits.")
        resume = self.resume_from_checkpoint
        if resume not in (None, "", "latest") and not Path(resume).is_dir():
            raise FileNotFoundError(f"resume_from_checkpoint: {resume!r} is not a checkpoint folder; pass 'latest' or "
                                    f"a checkpoint-<step> folder.")


def launch_state():
    """accelerate's ``PartialState`` of this launch (``cpu=True`` without CUDA: torchrun-style CPU launches
    then run as MULTI_CPU with gloo)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def validate_for_launch(config: DistillConfig) -> DistillConfig:
    """:meth:`DistillConfig.validate` with the number of processes of this launch."""
    return config.validate(launch_state().num_processes)
