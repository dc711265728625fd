"""The generic distillation trainer: a short loop over a :class:`~fastgen.training.method.DistillMethod`
on ``accelerate``.

One generator step (the unit of every budget, spec §0.2) has named phases, as in NVlabs/edm's
training loop:

1. **critic**: ``critic_steps_per_generator_step`` updates of every non-generator optimiser group
   (fake score, discriminator), each accumulating ``gradient_accumulation_steps`` micro-batches;
2. **generator**: one update of the ``"generator"`` group, same accumulation;
3. **EMA** of the student (``diffusers.training_utils.EMAModel``);
4. **report**: losses, learning rates and gradient norms to the JSONL log (always, in the run folder),
   to accelerate's trackers (tensorboard when installed) and to the progress bar;
5. **evaluate** every ``validation_steps``: samples from fixed seeds with the EMA student, digits FID
   and accuracy through the evaluator, a sample grid PNG;
6. **snapshot** every ``checkpointing_steps``: an atomic checkpoint (:mod:`.checkpoint`).

Randomness: each micro-batch of each update has its own generator, seeded from
``(seed, step, phase, critic iteration, chunk)`` where the chunk index ``rank * accumulation + micro``
numbers the slices of the global batch. Inputs (noise, labels, real rows, the method's draws) are thus
functions of the step counter only — a resumed run continues exactly — and two runs with the same
``processes x gradient_accumulation_steps`` see identical data (2 processes = 1 process with 2
accumulation micro-batches). Each process draws its own chunks, so ranks are seeded differently.

Optimisers: one AdamW per group of :meth:`DistillMethod.optimizer_groups`, each with its diffusers lr
schedule (warm-up in generator steps; the critic's in critic updates = warm-up x ratio). During a
phase the other groups' parameters have ``requires_grad`` off, so no gradient leaks between phases
(e.g. the GAN generator term through the discriminator head). DDP runs with
``find_unused_parameters=True`` (each phase uses a subset of the parameters, spec §1.4).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoint import (CheckpointError, finalize_checkpoint, latest_checkpoint, load_network, rotate_checkpoints,
                         save_network, verify_checkpoint)
from .config import DistillConfig
from .data import RealData, load_real_data, seeded_generator
from .method import Batch, DistillMethod

PHASES = {"critic": 1, "generator": 2}
GENERATOR_GROUP = "generator"
LOG_NAME = "train_log.jsonl"
# options a resumed run may change without changing what is trained (budget, bookkeeping, evaluation)
RESUME_FREE_OPTIONS = frozenset({"max_train_steps", "resume_from_checkpoint", "output_dir", "checkpointing_steps",
                                 "checkpoints_total_limit", "validation_steps", "num_validation_samples",
                                 "validation_seed", "validation_batch_size", "logging_steps", "report_to", "progress"})


# ---------------------------------------------------------------------- evaluator (one switch point)
def evaluate_samples(images01: torch.Tensor, labels: torch.Tensor | None, *, accelerator=None,
                     reference: str = "builtin:digits", extractor: str = "digits") -> dict[str, float]:
    """Metrics of generated images in [0, 1] through the evaluator (``fastgen.metrics.evaluate_images``: FID,
    KID, precision/recall, class accuracy, roughness, ...); every process calls it (features are sharded over
    ``accelerator``'s processes and reduced)."""
    from ..metrics import evaluate_images

    n = int(images01.shape[0])
    res = evaluate_images(images01, labels=labels, extractor=extractor, reference=reference, progress=False,
                          accelerator=accelerator, kid_subset_size=min(1000, n))
    return {k: float(v) for k, v in res.to_dict().items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}


def build_method(config: DistillConfig, teacher) -> DistillMethod:
    """Instantiate ``config.method`` on the teacher with its config (:meth:`DistillConfig.method_config`)."""
    cls = config.method_class()
    method_config = config.method_config()
    if isinstance(method_config, dict):
        return cls(teacher, **method_config)
    return cls(teacher, config=method_config)


class DistillTrainer:
    """Train ``method`` (built from ``config`` when not given) and save checkpoints, logs and the student.

    Args:
        config: the run's :class:`DistillConfig` (validated here, before any model is loaded).
        method: a ready method (tests, custom methods); default: ``config.method`` on the loaded teacher.
        teacher: a ready :class:`~fastgen.training.teacher.Teacher`; default: ``config.teacher`` loaded.
        real_data: a ready :class:`~fastgen.training.data.RealData`; default: from ``config.dataset``.
        sample_shape: the student's noise shape ``(C, H, W)`` (default: the teacher's).
        num_classes: classes for label draws (default: the teacher's); ``None`` with no teacher -> labels
            are ``None``.
        accelerator: a ready ``accelerate.Accelerator`` (default: one built from the config).
    """

    def __init__(self, config: DistillConfig, method: DistillMethod | None = None, teacher=None, *,
                 real_data: RealData | None = None, sample_shape: tuple[int, ...] | None = None,
                 num_classes: int | None = None, accelerator=None):
        from .config import launch_state

        num_processes = accelerator.num_processes if accelerator is not None else launch_state().num_processes
        config.validate(num_processes, check_paths=method is None or teacher is not None)
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.accelerator = accelerator or self._make_accelerator(config)
        acc = self.accelerator
        torch.manual_seed(config.seed + acc.process_index)  # incidental draws (e.g. module init) differ per rank

        if method is None:
            if teacher is None:
                from .teacher import load_teacher
                teacher = load_teacher(config)
            method = build_method(config, teacher)
        self.teacher = teacher
        self.method = method
        if teacher is not None:
            # frozen weights in the autocast dtype on GPU (as diffusers' training examples); fp32 on CPU
            weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(acc.mixed_precision)
            teacher.to(acc.device, dtype=weight_dtype if acc.device.type == "cuda" else None)
            sample_shape = sample_shape or tuple(teacher.sample_shape)
            num_classes = num_classes if num_classes is not None else teacher.num_classes
        if sample_shape is None:
            sample_shape = tuple(getattr(method, "sample_shape", ()))
        if not sample_shape:
            raise ValueError("sample_shape: pass the student's noise shape (C, H, W) when no teacher is given.")
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.num_classes = num_classes
        self.prompts: list[str] | None = None
        if teacher is not None and getattr(teacher, "is_text", False):
            if not config.prompts:
                raise ValueError("prompts: a text-to-image teacher needs a prompt file (one prompt per line).")
            self.prompts = [line.strip() for line in Path(config.prompts).read_text().splitlines() if line.strip()]
            if not self.prompts:
                raise ValueError(f"prompts: {config.prompts!r} holds no prompts.")
        if real_data is None and getattr(method, "needs_real_data", False):
            real_data = load_real_data(config.dataset, teacher_name=config.teacher, sample_shape=self.sample_shape,
                                       latent=bool(teacher is not None and teacher.vae is not None), seed=config.seed,
                                       resolution=config.resolution)
            if real_data is None:
                raise ValueError(f"dataset: method {config.method!r} needs real data for its GAN term; pass "
                                 f"builtin:digits, an image folder or latents (got {config.dataset!r}).")
        self.real_data = real_data

        # --- optimisers, one AdamW (and lr schedule) per group
        groups = method.optimizer_groups()
        if GENERATOR_GROUP not in groups:
            raise ValueError(f"{type(method).__name__}.optimizer_groups() must contain a 'generator' group, "
                             f"got {sorted(groups)}.")
        self.group_names = list(groups)
        self.critic_groups = [g for g in self.group_names if g != GENERATOR_GROUP]
        self.params = {g: [p for p in ps] for g, ps in groups.items()}
        for ps in self.params.values():
            for p in ps:
                p.requires_grad_(True)
        method.to(acc.device)
        for ps in self.params.values():  # trainable weights stay fp32 (a LoRA on a bf16 teacher base)
            for p in ps:
                p.data = p.data.float()
        self.optimizers = {}
        for g in self.group_names:
            lr = config.group_learning_rate(g)
            self.optimizers[g] = torch.optim.AdamW(self.params[g], lr=lr, betas=(config.adam_beta1, config.adam_beta2),
                                                   weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
        prepared = acc.prepare(method, *[self.optimizers[g] for g in self.group_names])
        self.model = prepared[0]
        self.optimizers = dict(zip(self.group_names, prepared[1:]))
        from diffusers.optimization import get_scheduler
        self.schedulers = {}
        for g in self.group_names:
            per_gen = 1 if g == GENERATOR_GROUP else config.critic_steps_per_generator_step
            self.schedulers[g] = get_scheduler(config.lr_scheduler, optimizer=self.optimizers[g].optimizer,
                                               num_warmup_steps=config.lr_warmup_steps * per_gen,
                                               num_training_steps=config.max_train_steps * per_gen)

        self.ema = None
        if config.use_ema:
            from diffusers.training_utils import EMAModel
            self.ema = EMAModel(self.params[GENERATOR_GROUP], decay=config.ema_decay,
                                update_after_step=config.ema_update_after_step)
            self.ema.to(acc.device)

        from accelerate.utils import DistributedType
        self._plain_steps = acc.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU,
                                                     DistributedType.MULTI_CPU)
        acc.register_save_state_pre_hook(self._save_hook)
        acc.register_load_state_pre_hook(self._load_hook)
        self.step = 0
        self._log_file = None

    # ------------------------------------------------------------------ setup helpers
    @staticmethod
    def _make_accelerator(config: DistillConfig):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

        mp = config.mixed_precision
        if mp == "auto":
            mp = os.environ.get("ACCELERATE_MIXED_PRECISION") or ("bf16" if torch.cuda.is_available() else "no")
        log_with = None
        if config.report_to in ("auto", "tensorboard"):
            try:
                import tensorboard  # noqa: F401
                log_with = "tensorboard"
            except ImportError:
                if config.report_to == "tensorboard":
                    raise ValueError("report_to: tensorboard is not installed (pip install tensorboard), "
                                     "or pass --report_to none.") from None
        out = Path(config.output_dir)
        # cpu=True on machines without CUDA lets torchrun-style launches run as MULTI_CPU (gloo)
        return Accelerator(mixed_precision=mp, log_with=log_with, gradient_accumulation_steps=1, cpu=not torch.cuda.is_available(),
                           project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
                           kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])

    @property
    def unwrapped(self) -> DistillMethod:
        return self.accelerator.unwrap_model(self.model)

    @property
    def student(self) -> torch.nn.Module:
        return self.method.student()

    def _networks(self) -> dict[str, torch.nn.Module]:
        """The method's trainable submodules, by attribute name (one checkpoint folder each)."""
        trainable = {id(p) for ps in self.params.values() for p in ps}
        return {name: mod for name, mod in self.method.named_children()
                if any(id(p) in trainable for p in mod.parameters())}

    # ------------------------------------------------------------------ checkpoint hooks
    def _save_hook(self, models, weights, output_dir):
        if self.accelerator.is_main_process:
            for name, net in self._networks().items():
                save_network(net, Path(output_dir) / name)
            if self.ema is not None:
                params = self.params[GENERATOR_GROUP]
                self.ema.store(params)
                self.ema.copy_to(params)
                try:
                    save_network(self.student, Path(output_dir) / "student_ema")
                finally:
                    self.ema.restore(params)
        while weights:
            weights.pop()

    def _load_hook(self, models, input_dir):
        if self.ema is not None:  # EMA weights pass through the student, then the networks are loaded
            load_network(self.student, Path(input_dir) / "student_ema")
            for shadow, p in zip(self.ema.shadow_params, self.params[GENERATOR_GROUP]):
                shadow.data.copy_(p.data)
        for name, net in self._networks().items():
            load_network(net, Path(input_dir) / name)
        while models:
            models.pop()

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoint-<step>`` atomically (see :mod:`.checkpoint`); rotate old ones."""
        acc = self.accelerator
        final = self.output_dir / f"checkpoint-{self.step}"
        tmp = self.output_dir / f"checkpoint-{self.step}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {"step": self.step, "schedulers": {g: s.state_dict() for g, s in self.schedulers.items()},
                     "method": self.method.trainer_state()}
            if self.ema is not None:
                ema_state = self.ema.state_dict()
                ema_state.pop("shadow_params", None)
                ema_state.pop("collected_params", None)
                state["ema"] = ema_state
            torch.save(state, tmp / "trainer_state.pt")
            (tmp / "trainer_state.json").write_text(json.dumps(
                {"step": self.step, "config": self.config.to_dict(), "networks": sorted(self._networks())}, indent=1))
            finalize_checkpoint(tmp, final, self.step)
            rotate_checkpoints(self.output_dir, self.config.checkpoints_total_limit)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore a checkpoint (verified first: a broken one raises an error naming the file)."""
        path = Path(path)
        step = verify_checkpoint(path)
        try:
            state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling failure names the file
            raise CheckpointError(f"cannot read checkpoint file {str(path / 'trainer_state.pt')!r}: {err}") from None
        self.accelerator.load_state(str(path))
        for g, s in self.schedulers.items():
            s.load_state_dict(self._rebased_scheduler_state(g, state["schedulers"][g]))
        if self.ema is not None and "ema" in state:
            ema = self.ema
            for key, value in state["ema"].items():
                setattr(ema, key, value)
            # this run's EMA options, not the checkpoint's (a resume that changes them says so: see _resume)
            ema.decay, ema.update_after_step = self.config.ema_decay, self.config.ema_update_after_step
        self.method.load_trainer_state(state.get("method", {}))
        self.step = int(state["step"])
        if self.step != step:
            raise CheckpointError(f"checkpoint {str(path)!r}: trainer_state.pt says step {self.step}, the marker {step}.")

    def _resume(self) -> None:
        resume = self.config.resume_from_checkpoint
        if not resume:
            return
        if resume == "latest":
            path = latest_checkpoint(self.output_dir, log=self._print)
            if path is None:
                self._print(f"resume_from_checkpoint=latest: no complete checkpoint in {self.output_dir}; starting fresh.")
                return
        else:
            path = Path(resume)
        self.load_checkpoint(path)
        self._trim_log()
        self._print(f"resumed from {path} at generator step {self.step}")
        changed = self.resume_changes(path)
        if changed:
            self._print("resumed with other options than the checkpoint's run (the run goes on with the new ones): "
                        + "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changed))

    def _rebased_scheduler_state(self, group: str, saved: dict) -> dict:
        """A saved learning-rate scheduler state at this run's rate for ``group``: the position in the schedule
        (steps taken, warm-up) is the checkpoint's, the base rate this run's, so a resume with another learning
        rate runs at it (identical state when the rate is unchanged)."""
        lr = self.config.group_learning_rate(group)
        old = list(saved.get("base_lrs") or [])
        if not old:
            return saved
        out = {**saved, "base_lrs": [lr] * len(old)}
        if saved.get("_last_lr") is not None:
            out["_last_lr"] = [value * lr / base for value, base in zip(saved["_last_lr"], old)]
        return out

    def resume_changes(self, path: str | os.PathLike) -> list[tuple[str, Any, Any]]:
        """``(option, checkpoint's value, this run's value)`` for every option that differs from the checkpoint's
        run, except budget and bookkeeping (:data:`RESUME_FREE_OPTIONS`): a warm start on purpose, or a mistake."""
        record = Path(path) / "trainer_state.json"
        saved = json.loads(record.read_text()).get("config") or {} if record.is_file() else {}
        if saved:  # an option added after the checkpoint was written ran at its default
            for f in dataclasses.fields(self.config):
                if f.name not in saved and f.default is not dataclasses.MISSING:
                    saved[f.name] = json.loads(json.dumps(f.default, default=str))
        now = json.loads(json.dumps(self.config.to_dict(), default=str))  # the same round trip as the saved one
        return [(k, saved[k], now[k]) for k in sorted(saved.keys() & now.keys())
                if k not in RESUME_FREE_OPTIONS and saved[k] != now[k]]

    def _trim_log(self) -> None:
        """Drop log records after the resumed step (written by the interrupted run), so curves have one
        record per step."""
        log = self.output_dir / LOG_NAME
        if not self.accelerator.is_main_process or not log.is_file():
            return
        keep = []
        for line in log.read_text().splitlines():
            try:
                if int(json.loads(line).get("step", 0)) <= self.step:
                    keep.append(line)
            except (ValueError, AttributeError):
                continue
        tmp = log.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, log)

    # ------------------------------------------------------------------ batches
    def _batches(self, phase: str, critic_iter: int):
        """The micro-batches of one update on this process."""
        cfg, acc = self.config, self.accelerator
        accum = cfg.gradient_accumulation_steps
        chunk = cfg.train_batch_size // (acc.num_processes * accum)
        ratio = cfg.critic_steps_per_generator_step
        update_index = self.step * (ratio + 1) + (critic_iter if phase == "critic" else ratio)
        device = acc.device
        for micro in range(accum):
            chunk_index = acc.process_index * accum + micro
            gen = seeded_generator(cfg.seed, self.step, PHASES[phase], critic_iter, chunk_index, device=device)
            labels = self._draw_labels(chunk, gen)
            noise = torch.randn((chunk, *self.sample_shape), generator=gen, device=device)
            real = real_labels = None
            if self.real_data is not None:
                real, real_labels = self.real_data.rows(update_index * cfg.train_batch_size + chunk_index * chunk, chunk)
                real = real.to(device)
                if not self.real_data.is_latent and self.teacher is not None and self.teacher.vae is not None:
                    real = self.teacher.encode(real, gen)
                real_labels = real_labels.to(device) if real_labels is not None else None
            yield Batch(labels=labels, noise=noise, real=real, generator=gen, real_labels=real_labels)

    def _draw_labels(self, n: int, gen: torch.Generator):
        """Conditions of ``n`` rows: class ids, encoded prompts (``{"cond", "uncond"}``) or ``None``."""
        device = self.accelerator.device
        if self.prompts is not None:
            idx = torch.randint(0, len(self.prompts), (n,), generator=gen, device=gen.device).tolist()
            return self.teacher.encode_prompts([self.prompts[i] for i in idx], device)
        if self.num_classes:
            return torch.randint(0, self.num_classes, (n,), generator=gen, device=gen.device).to(device)
        return None

    def _fixed_labels(self, ids: range):
        """Conditions of evaluation samples ``ids``: class ``i % num_classes`` or prompt ``i % len(prompts)``."""
        device = self.accelerator.device
        if self.prompts is not None:
            return self.teacher.encode_prompts([self.prompts[i % len(self.prompts)] for i in ids], device)
        if self.num_classes:
            return torch.tensor([i % self.num_classes for i in ids], device=device)
        return None

    def _set_trainable(self, groups: list[str]) -> None:
        on = set(groups)
        for g, ps in self.params.items():
            for p in ps:
                p.requires_grad_(g in on)

    def _update(self, phase: str, groups: list[str], critic_iter: int, stats: dict) -> None:
        """One optimiser update of ``groups``: accumulate micro-batches, clip, step, schedule."""
        acc, cfg = self.accelerator, self.config
        accum = cfg.gradient_accumulation_steps
        self._set_trainable(groups)
        update: dict[str, torch.Tensor] = {}
        for micro, batch in enumerate(self._batches(phase, critic_iter)):
            ctx = acc.no_sync(self.model) if micro < accum - 1 else nullcontext()
            with ctx:
                out = self.model(phase, batch)
                if "loss" not in out:
                    raise KeyError(f"{type(self.method).__name__}.{phase}_loss must return a dict with 'loss'.")
                acc.backward(out["loss"] / accum)
            for key, value in out.items():
                k = f"{phase}/{key}"
                v = value.detach().float().mean() / accum
                update[k] = update[k] + v if k in update else v
        scaler = acc.scaler
        # Plain DDP / single device: torch's clip and the raw optimiser step (accelerate's wrappers probe
        # installed packages on every call, ~10% of a small model's step); sharded setups go through accelerate.
        plain = self._plain_steps
        for g in groups:
            opt = self.optimizers[g]
            if cfg.max_grad_norm > 0:
                if scaler is not None:
                    scaler.unscale_(opt.optimizer)
                    norm = torch.nn.utils.clip_grad_norm_(self.params[g], cfg.max_grad_norm)
                elif plain:
                    norm = torch.nn.utils.clip_grad_norm_(self.params[g], cfg.max_grad_norm)
                else:
                    norm = acc.clip_grad_norm_(self.params[g], cfg.max_grad_norm)
                update[f"grad_norm/{g}"] = torch.as_tensor(norm, device=acc.device).detach().float()
        for g in groups:  # the method's per-step multiplier of the scheduled rate (the scheduler recomputes it)
            scale = self.method.learning_rate_scale(g)
            for group, lr in zip(self.optimizers[g].optimizer.param_groups, self.schedulers[g].get_last_lr()):
                group["lr"] = lr * scale
        if scaler is not None:  # one scaler update for all optimisers of the phase
            for g in groups:
                scaler.step(self.optimizers[g].optimizer)
            scaler.update()
        else:
            for g in groups:
                (self.optimizers[g].optimizer if plain else self.optimizers[g]).step()
        for g in groups:
            self.schedulers[g].step()
            self.optimizers[g].zero_grad(set_to_none=True)
        for k, v in update.items():  # running (sum, count) per key: means over updates since the last report
            total, n = stats.get(k, (0.0, 0))
            stats[k] = (total + v, n + 1)

    # ------------------------------------------------------------------ reporting
    def _print(self, msg: str) -> None:
        if self.accelerator.is_main_process:
            from tqdm.auto import tqdm
            tqdm.write(f"[fastgen distill] {msg}")

    def _log(self, record: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        if self._log_file is None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.output_dir / LOG_NAME, "a")
        self._log_file.write(json.dumps(record) + "\n")
        self._log_file.flush()

    def _reduce_stats(self, stats: dict[str, tuple[torch.Tensor, int]]) -> dict[str, float]:
        keys = sorted(stats)
        if not keys:
            return {}
        vec = torch.stack([stats[k][0] / stats[k][1] for k in keys])
        vec = self.accelerator.reduce(vec, reduction="mean")
        return {k: float(v) for k, v in zip(keys, vec.tolist())}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def generate(self, num_samples: int, seed: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Samples in [0, 1] of the current (EMA) student: sample i uses seed ``seed + i`` and label
        ``i % num_classes``; returns ``(images01 [N, C, H, W] on CPU, labels)``."""
        device = self.accelerator.device
        images, all_labels = [], []
        for start in range(0, num_samples, batch_size):
            ids = range(start, min(num_samples, start + batch_size))
            noise = torch.stack([torch.randn(self.sample_shape, generator=torch.Generator().manual_seed(seed + i))
                                 for i in ids]).to(device)
            labels = self._fixed_labels(ids)
            with self.accelerator.autocast():
                x = self.method.sample(noise, labels)
            if self.teacher is not None and self.teacher.vae is not None:
                x = self.teacher.decode(x)
            images.append(((x.float().clamp(-1, 1) + 1) / 2).cpu())
            if isinstance(labels, torch.Tensor):
                all_labels.append(labels.cpu())
        return torch.cat(images), (torch.cat(all_labels) if all_labels else None)

    def evaluate(self) -> dict[str, float]:
        """Evaluate the EMA student on the fixed seed set and write a sample grid (main process).

        Every process generates the same samples (seeded per sample) and takes part in the evaluator's
        sharded feature pass, so no process waits on a collective another one skips."""
        cfg, acc = self.config, self.accelerator
        metrics: dict[str, float] = {}
        params = self.params[GENERATOR_GROUP]
        if self.ema is not None:
            self.ema.store(params)
            self.ema.copy_to(params)
        was_training = self.method.training
        self.method.eval()
        try:
            t0 = time.perf_counter()
            images, labels = self.generate(cfg.num_validation_samples, cfg.validation_seed, cfg.validation_batch_size)
            gen_s = time.perf_counter() - t0
            if cfg.teacher == "builtin:digits":
                metrics = evaluate_samples(images, labels, accelerator=acc)
            metrics["generate_seconds"] = gen_s
            if acc.is_main_process:
                self._write_grid(images[:100], labels)
        finally:
            self.method.train(was_training)
            if self.ema is not None:
                self.ema.restore(params)
        acc.wait_for_everyone()
        return metrics

    def _write_grid(self, images01: torch.Tensor, labels) -> Path:
        from ..grid import image_grid

        folder = self.output_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        arrays = [im.permute(1, 2, 0).squeeze(-1).numpy() if im.shape[0] == 1 else im.permute(1, 2, 0).numpy()
                  for im in images01]
        grid = image_grid(arrays, ncols=10, cell_size=32, title=f"step {self.step}")
        path = folder / f"step-{self.step:07d}.png"
        tmp = path.with_suffix(".tmp.png")
        grid.save(tmp)
        os.replace(tmp, path)
        return path

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, Any]:
        """Run (or resume) training to ``max_train_steps`` generator steps; return a summary."""
        cfg, acc = self.config, self.accelerator
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._resume()
        if acc.log_with:
            acc.init_trackers("fastgen-distill", config={k: v for k, v in cfg.to_dict().items()
                                                         if isinstance(v, (int, float, str, bool))})
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_train_steps, initial=self.step, disable=not (cfg.progress and acc.is_main_process),
                   desc="distill", unit="step", dynamic_ncols=True)
        self.method.train()
        stats: dict[str, tuple[torch.Tensor, int]] = {}
        count = 0
        last_log, last_cpu = time.perf_counter(), time.process_time()
        start_step = self.step
        metrics: dict[str, float] = {}
        while self.step < cfg.max_train_steps:
            # 0. the method's step hook (DisBack's node schedule, MSD's active student; default nothing)
            self.method.begin_generator_step(self.step)
            # 1. critic
            if self.critic_groups and self.method.trains_critic:
                for k in range(cfg.critic_steps_per_generator_step):
                    self._update("critic", self.critic_groups, k, stats)
            # 2. generator (a step without one, e.g. MSD's critic warm-up or DisBack's recording stage, still
            #    advances its schedule)
            trains_generator = self.method.trains_generator
            if trains_generator:
                self._update("generator", [GENERATOR_GROUP], 0, stats)
            else:
                with warnings.catch_warnings():  # the schedule counts steps: advancing it before any update is meant
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
                    self.schedulers[GENERATOR_GROUP].step()
            # 3. EMA: it follows the generator's updates only, so its decay warm-up ((1 + n) / (10 + n)) counts
            #    updates, not steps in which the generator stood still
            if self.ema is not None and trains_generator:
                self.ema.step(self.params[GENERATOR_GROUP])
            self.step += 1
            count += 1
            bar.update(1)
            # 4. report
            if self.step % cfg.logging_steps == 0 or self.step == cfg.max_train_steps:
                values = self._reduce_stats(stats)
                now = time.perf_counter()
                values["lr/generator"] = self.schedulers[GENERATOR_GROUP].get_last_lr()[0]
                for g in self.critic_groups:
                    values[f"lr/{g}"] = self.schedulers[g].get_last_lr()[0]
                values["seconds_per_step"] = (now - last_log) / count  # wall clock, training only
                values["cpu_seconds_per_step"] = (time.process_time() - last_cpu) / count  # all threads
                values["steps_in_window"] = count  # after a resume the first window is shorter than its step
                self._log({"step": self.step, **values})
                if acc.log_with:
                    acc.log(values, step=self.step)
                bar.set_postfix({k.split("/", 1)[0][:3] + "_loss": f"{v:.4g}" for k, v in values.items()
                                 if k.endswith("/loss")})
                stats, count, last_log, last_cpu = {}, 0, now, time.process_time()
            # 5. evaluate (its time is not training time: the step timers skip it)
            if cfg.validation_steps and self.step % cfg.validation_steps == 0:
                eval_wall, eval_cpu = time.perf_counter(), time.process_time()
                metrics = self.evaluate()
                self.method.observe_evaluation(self.step, metrics)  # before the step's checkpoint, which keeps it
                last_log += time.perf_counter() - eval_wall
                last_cpu += time.process_time() - eval_cpu
                if metrics:
                    self._log({"step": self.step, **{f"eval/{k}": v for k, v in metrics.items()}})
                    if acc.log_with:
                        acc.log({f"eval/{k}": v for k, v in metrics.items()}, step=self.step)
                    self._print(f"step {self.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            # 6. snapshot
            if self.step % cfg.checkpointing_steps == 0 or self.step == cfg.max_train_steps:
                self.save_checkpoint()
        bar.close()
        student_dir = self.export_student()
        acc.end_training()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return {"output_dir": str(self.output_dir), "student": str(student_dir) if student_dir else None,
                "step": self.step, "steps_this_run": self.step - start_step, "metrics": metrics}

    def export_student(self) -> Path | None:
        """Save the (EMA) student under ``<output_dir>/student``: a :class:`FastGenStudentPipeline` folder for
        class-conditional teachers (methods with ``student_network()``), else the student network's folder."""
        acc = self.accelerator
        folder = self.output_dir / "student"
        if acc.is_main_process:
            params = self.params[GENERATOR_GROUP]
            if self.ema is not None:
                self.ema.store(params)
                self.ema.copy_to(params)
            try:
                tmp = folder.with_name("student.tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                network_fn = getattr(self.method, "student_network", None)
                pipe = getattr(self.teacher, "pipeline", None)
                own = self.method.export_pipeline(pipe) if pipe is not None else None  # e.g. MSD's router
                if own is not None:
                    own.save_pretrained(tmp)
                elif network_fn is not None and pipe is not None and hasattr(pipe, "num_classes"):
                    from ..pipelines.student import FastGenStudentPipeline

                    method_config = getattr(self.method, "config", None)
                    timesteps = list(getattr(method_config, "student_timesteps", self.config.student_timesteps))
                    renoise = getattr(method_config, "student_renoise", self.config.student_renoise)
                    student_pipe = FastGenStudentPipeline.from_teacher(pipe, network_fn(), timesteps, renoise)
                    student_pipe.save_pretrained(tmp)
                elif network_fn is not None:
                    save_network(network_fn(), tmp)
                else:
                    save_network(self.student, tmp)
                shutil.rmtree(folder, ignore_errors=True)
                os.replace(tmp, folder)
            finally:
                if self.ema is not None:
                    self.ema.restore(params)
        acc.wait_for_everyone()
        return folder


def run_distillation(config: DistillConfig, **kwargs) -> dict[str, Any]:
    """Validate ``config``, load the teacher, build the method and train; return the summary."""
    return DistillTrainer(config, **kwargs).train()


def read_run_log(folder: str | os.PathLike, keys: tuple[str, ...] = ("fid", "accuracy", "roughness", "precision",
                                                                     "recall")) -> list[dict]:
    """The evaluations of a run folder's ``train_log.jsonl``, each with the training minutes spent up to it.

    Per logging window the trainer records wall and CPU (process, all threads) seconds per generator step,
    evaluations excluded; ``cpu_minutes`` does not depend on how busy the machine was (``None`` for logs
    written before CPU time was recorded).
    """
    path = Path(folder, LOG_NAME)
    if not path.is_file():
        raise FileNotFoundError(f"run folder {str(folder)!r} has no {LOG_NAME}; is it a fastgen distill output_dir?")
    wall = cpu = 0.0
    rows, last_step = [], 0
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "seconds_per_step" in record:  # one record per logging window, seconds averaged over it
            # the window's own length when logged: a run warm-started from another folder's checkpoint
            # begins its log at that checkpoint's step, and its first window is not all the steps before it
            n = record.get("steps_in_window", record["step"] - last_step)
            wall += record["seconds_per_step"] * n / 60
            cpu += record.get("cpu_seconds_per_step", math.nan) * n / 60
            last_step = record["step"]
        if "eval/fid" in record:
            rows.append({"step": record["step"], "wall_minutes": round(wall, 2),
                         "cpu_minutes": None if math.isnan(cpu) else round(cpu, 2),
                         **{k: record.get(f"eval/{k}") for k in keys}})
    return rows


def run_summary(folder: str | os.PathLike, step: int | None = None) -> dict:
    """What an asset builder records of a finished run: the generator ``step`` it exports (default: the last
    evaluated one), the CPU minutes of training up to it, and the run's configuration (from its newest
    checkpoint; ``{}`` when none is left)."""
    from .checkpoint import list_checkpoints

    log = read_run_log(folder)
    if step is None:
        step = max((r["step"] for r in log), default=0)
    at = next((r for r in log if r["step"] == step), None)
    checkpoints = list_checkpoints(folder)
    state = checkpoints[-1][1] / "trainer_state.json" if checkpoints else None
    config = json.loads(state.read_text())["config"] if state is not None and state.is_file() else {}
    return {"step": step, "cpu_minutes": at["cpu_minutes"] if at else None, "config": config}
