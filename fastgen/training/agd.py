"""AGD: adapter guidance distillation -- CFG trajectories, a memory-mapped store, and the training method.

Jensen & Sadat, *Efficient Distillation of Classifier-Free Guidance using Adapters* (arXiv:2503.07274,
TMLR 2025); spec ``shared/methods/distillation.md`` §5 and §0.12.

1. **Trajectories** (:func:`collect_trajectories`, ``fastgen distill collect-trajectories``): the frozen base
   samples from noise with real CFG; trajectory ``i`` draws its ``omega ~ U[omega_min, omega_max]`` once and
   keeps it; at every step the store keeps ``(x_t, t, condition, omega, eps~)`` where ``x_t`` is the network
   input, ``t`` the network timestep and ``eps~ = out_u + omega (out_c - out_u)`` the CFG-combined *raw*
   model output (epsilon for epsilon models, v for v models; spec §0.12). Storage: fp16 ``.npy`` memmaps
   (:class:`TrajectoryStore`). Trajectory ``i``'s noise, ``omega`` and condition depend only on
   ``(seed, i)``, so a run is resumable (finished trajectories are flagged after their rows are flushed) and
   shardable (rank ``r`` of ``n`` fills trajectories ``i % n == r``) with identical results.
2. **Training** (:class:`AGD`, ``fastgen distill --method agd``): only the adapter trains;
   ``L = E || out_{theta,psi}(x_t, t, c, omega) - eps~ ||^2`` in fp32 over rows drawn uniformly over
   (trajectory, step). The paper's optimiser is AdamW (lr 1e-4, no weight decay, 10% linear warm-up, cosine
   decay): the trainer's ``lr_scheduler=cosine`` with ``lr_warmup_steps``; see ``distill/digits-agd.yaml``.
   ``source="forward_noised"`` is the classic baseline (guidance distillation on forward-noised real data,
   Meng et al. 2023, arXiv:2210.03142): ``x_t = alpha x0 + sigma eps`` from the data, ``omega`` drawn per
   row, the target computed online by the base with CFG.
"""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..denoiser import GuidedDenoiser, Prediction, GuidanceContext, concat_conditions
from .data import seeded_generator
from .method import Batch, DistillMethod

SOURCES = ("trajectories", "forward_noised")
STORE_VERSION = 1
META_NAME = "meta.json"
_OMEGA_STREAM = 1  # seeded_generator(seed, i, stream): 0 = noise, 1 = omega


# ---------------------------------------------------------------------- CFG target (one place)
def cfg_output(denoiser, x: torch.Tensor, t, cond: dict, uncond: dict, omega: torch.Tensor) -> torch.Tensor:
    """The CFG-combined raw output ``out_u + omega (out_c - out_u)`` with one ``omega`` per row (one batched
    forward, unconditional first, as diffusers orders it; Ho & Salimans 2022, arXiv:2207.12598)."""
    tt = torch.as_tensor(t, device=x.device)
    raw_u, raw_c = denoiser(torch.cat([x, x]), torch.cat([tt, tt]) if tt.ndim else tt,
                            concat_conditions([uncond, cond])).chunk(2)
    w = omega.to(raw_c.device, raw_c.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    return raw_u + w * (raw_c - raw_u)


class _RecordingCFG(GuidedDenoiser):
    """A guided denoiser with per-row CFG scales that records every step's (input, timestep, combined output)."""

    def __init__(self, denoiser, cond, uncond, omega: torch.Tensor):
        super().__init__(denoiser, guider=None, cond=cond, uncond=uncond, guidance_space="model")
        self.omega = omega
        self.record: list[tuple[torch.Tensor, float, torch.Tensor]] = []

    def forward(self, x, t, cond=None, uncond=None, step=None) -> Prediction:
        out = cfg_output(self.denoiser, x, t, self.cond, self.uncond, self.omega)
        self.record.append((x.detach().to("cpu", torch.float16), float(t), out.detach().to("cpu", torch.float16)))
        return Prediction(out, torch.full((x.shape[0],), 2, dtype=torch.long),
                          GuidanceContext(self.denoiser, x, t, "model"))


# ---------------------------------------------------------------------- the store
def _flatten(cond: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for key, value in cond.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, torch.Tensor):
            out[prefix + key] = value
    return out


def _unflatten(flat: dict[str, torch.Tensor]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


class TrajectoryStore:
    """CFG trajectories as fp16 ``.npy`` memmaps in a folder (see the module docstring).

    Files: ``x_t.npy`` / ``target.npy`` ``[N, S, C, H, W]`` float16, ``t.npy`` ``[N, S]`` float32 (network
    timesteps), ``omega.npy`` ``[N]`` float32, ``cond.<key>.npy`` ``[N, ...]`` (class ids, or prompt
    embeddings in float16), ``done.npy`` ``[N]`` uint8, and ``meta.json``.
    """

    ARRAYS = ("x_t", "target", "t", "omega", "done")

    def __init__(self, folder: str | os.PathLike, mode: str = "r"):
        self.folder = Path(folder)
        meta_path = self.folder / META_NAME
        if not meta_path.is_file():
            raise FileNotFoundError(f"trajectories: {str(self.folder)!r} is not a trajectory store (no {META_NAME}); "
                                    f"create one with `fastgen distill collect-trajectories`.")
        self.meta = json.loads(meta_path.read_text())
        self.mode = mode
        names = list(self.ARRAYS) + [f"cond.{k}" for k in self.meta["condition"]]
        self.arrays = {}
        for name in names:
            path = self.folder / f"{name}.npy"
            if not path.is_file():
                raise FileNotFoundError(f"trajectory store file {str(path)!r} is missing.")
            self.arrays[name] = np.load(path, mmap_mode=mode)

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(cls, folder: str | os.PathLike, meta: dict, condition: dict[str, tuple[tuple[int, ...], str]]
               ) -> "TrajectoryStore":
        """Allocate the memmaps of ``meta["num_trajectories"] x meta["num_steps"]`` rows; ``condition`` maps a
        flattened condition key to ``(per-trajectory shape, numpy dtype)``. ``meta.json`` is written last."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        n, s, shape = int(meta["num_trajectories"]), int(meta["num_steps"]), tuple(meta["sample_shape"])
        specs = {"x_t": ((n, s, *shape), np.float16), "target": ((n, s, *shape), np.float16),
                 "t": ((n, s), np.float32), "omega": ((n,), np.float32), "done": ((n,), np.uint8)}
        for key, (cshape, dtype) in condition.items():
            specs[f"cond.{key}"] = ((n, *cshape), np.dtype(dtype))
        for name, (arr_shape, dtype) in specs.items():
            arr = np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=dtype, shape=arr_shape)
            arr.flush()
            del arr
        meta = {**meta, "version": STORE_VERSION,
                "condition": {k: {"shape": list(v[0]), "dtype": np.dtype(v[1]).name} for k, v in condition.items()}}
        tmp = folder / (META_NAME + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
        os.replace(tmp, folder / META_NAME)
        return cls(folder, mode="r+")

    # ------------------------------------------------------------------ facts
    @property
    def num_trajectories(self) -> int:
        return int(self.meta["num_trajectories"])

    @property
    def num_steps(self) -> int:
        return int(self.meta["num_steps"])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.meta["sample_shape"])

    def done(self) -> np.ndarray:
        return np.asarray(self.arrays["done"]).astype(bool)

    @property
    def complete(self) -> bool:
        return bool(self.done().all())

    def pending(self, rank: int = 0, world: int = 1) -> list[int]:
        """Unfinished trajectories of shard ``rank`` (of ``world``)."""
        done = self.done()
        return [i for i in range(rank, self.num_trajectories, world) if not done[i]]

    # ------------------------------------------------------------------ writing
    def write(self, ids: Sequence[int], x_t: torch.Tensor, t: torch.Tensor, target: torch.Tensor,
              omega: torch.Tensor, cond: dict[str, torch.Tensor]) -> None:
        """Store whole trajectories ``ids`` (``x_t``/``target`` ``[len(ids), S, ...]``), flush, then flag them done."""
        idx = np.asarray(list(ids), dtype=np.int64)
        a = self.arrays
        a["x_t"][idx] = x_t.to(torch.float16).cpu().numpy()
        a["target"][idx] = target.to(torch.float16).cpu().numpy()
        a["t"][idx] = t.float().cpu().numpy()
        a["omega"][idx] = omega.float().cpu().numpy()
        for key, value in _flatten(cond).items():
            arr = a[f"cond.{key}"]
            arr[idx] = value.detach().cpu().numpy().astype(arr.dtype)
        for name, arr in a.items():
            if name != "done":
                arr.flush()
        a["done"][idx] = 1
        a["done"].flush()

    # ------------------------------------------------------------------ reading
    def rows(self, flat_index: np.ndarray) -> dict[str, Any]:
        """Rows by flat index ``trajectory * S + step``: ``x_t``, ``t``, ``target``, ``omega`` and ``cond``
        (nested network kwargs) as CPU tensors."""
        flat_index = np.asarray(flat_index, dtype=np.int64)
        traj, step = flat_index // self.num_steps, flat_index % self.num_steps
        a = self.arrays
        out = {"x_t": torch.from_numpy(np.asarray(a["x_t"][traj, step])),
               "target": torch.from_numpy(np.asarray(a["target"][traj, step])),
               "t": torch.from_numpy(np.asarray(a["t"][traj, step])),
               "omega": torch.from_numpy(np.asarray(a["omega"][traj]))}
        out["cond"] = _unflatten({k: torch.from_numpy(np.asarray(a[f"cond.{k}"][traj])) for k in self.meta["condition"]})
        return out

    def sample(self, n: int, generator: torch.Generator) -> dict[str, Any]:
        """``n`` rows drawn uniformly over (trajectory, step) with ``generator``."""
        k = torch.randint(0, self.num_trajectories * self.num_steps, (n,), generator=generator,
                          device=generator.device).cpu().numpy()
        return self.rows(k)


# ---------------------------------------------------------------------- collection
def _check_omega_range(name: str, value) -> tuple[float, float]:
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in value)
            or not 0.0 <= value[0] <= value[1]):
        raise ValueError(f"{name} must be a pair (low, high) of finite guidance scales with 0 <= low <= high, "
                         f"got {value!r}.")
    return float(value[0]), float(value[1])


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return value


def trajectory_inputs(i: int, seed: int, sample_shape: tuple[int, ...], omega_range: tuple[float, float]
                      ) -> tuple[torch.Tensor, float]:
    """Trajectory ``i``'s starting noise and guidance scale: functions of ``(seed, i)`` only."""
    noise = torch.randn(sample_shape, generator=seeded_generator(seed, i, 0))
    u = float(torch.rand((), generator=seeded_generator(seed, i, _OMEGA_STREAM)))
    return noise, omega_range[0] + (omega_range[1] - omega_range[0]) * u


def collect_trajectories(teacher: str = "builtin:digits", output_dir: str = "runs/agd-trajectories", *,
                         num_trajectories: int = 256, num_inference_steps: int = 50,
                         omega_range: Sequence[float] = (1.0, 8.0), seed: int = 0, batch_size: int = 64,
                         prompts: str | None = None, solver: str | None = None, progress: bool = True,
                         pipeline=None, state=None) -> dict[str, Any]:
    """Run the frozen base with CFG from noise and store its trajectories (resumable, sharded).

    Args:
        teacher: ``builtin:<name>`` or a diffusers pipeline folder (the base).
        output_dir: the store folder; an existing store with the same settings is resumed.
        num_trajectories: N; trajectory ``i`` is conditioned on class ``i % num_classes`` (or prompt
            ``i % len(prompts)``).
        num_inference_steps: solver steps per trajectory (rows per trajectory).
        omega_range: ``(low, high)``: each trajectory draws ``omega ~ U[low, high]`` once.
        seed: noise and omega seed.
        batch_size: trajectories sampled together.
        prompts: text-to-image bases: a file with one prompt per line.
        solver: ``None`` (the base pipeline's scheduler) or a fastgen solver name.
        pipeline: a ready pipeline instead of loading ``teacher`` (tests).
        state: an ``accelerate.PartialState`` (default: this launch's; one shard per process).

    Returns:
        ``{"output_dir", "num_trajectories", "num_steps", "collected" (this process), "complete"}``.
    """
    _positive("num_trajectories", num_trajectories)
    _positive("num_inference_steps", num_inference_steps)
    _positive("batch_size", batch_size)
    omega_range = _check_omega_range("omega_range", omega_range)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    if prompts is not None and not Path(prompts).is_file():
        raise FileNotFoundError(f"prompts: {prompts!r} is not a file (one prompt per line).")
    from ..builtin import model_label
    from ..pipelines.common import FastGenPipelineMixin
    from ..sampling import sample_loop
    from ..solvers import resolve_solver
    from .config import DistillConfig, launch_state
    from .teacher import load_pipeline, load_teacher

    state = state or launch_state()
    pipe = pipeline if pipeline is not None else load_pipeline(teacher)
    bundle = load_teacher(DistillConfig(teacher=teacher, guidance="none"), pipeline=pipe)
    device = state.device
    bundle.to(device)
    den = bundle.denoiser
    prompt_list = None
    if bundle.is_text:
        if prompts is None:
            raise ValueError(f"prompts: the base {teacher!r} is text-to-image; pass a prompt file (one per line).")
        prompt_list = [p.strip() for p in Path(prompts).read_text().splitlines() if p.strip()]
        if not prompt_list:
            raise ValueError(f"prompts: {prompts!r} holds no prompts.")
    elif bundle.num_classes is None:
        raise ValueError(f"teacher: {teacher!r} is neither class-conditional nor text-to-image; AGD needs a condition.")

    def conditions(ids: list[int]):
        if prompt_list is not None:
            enc = bundle.encode_prompts([prompt_list[i % len(prompt_list)] for i in ids], device)
            return enc["cond"], enc["uncond"]
        labels = torch.tensor([i % bundle.num_classes for i in ids], device=device)
        return bundle.cond(labels), bundle.uncond(labels)

    base_scheduler = resolve_solver(solver, pipe.scheduler)
    meta = {"teacher": model_label(getattr(pipe, "name_or_path", None)) or teacher,
            "num_trajectories": num_trajectories, "num_steps": num_inference_steps,
            "sample_shape": list(bundle.sample_shape), "omega_range": list(omega_range), "seed": seed,
            "solver": solver or type(base_scheduler).__name__, "prediction_type": den.prediction_type,
            "prompts": None if prompt_list is None else len(prompt_list)}
    folder = Path(output_dir)
    if state.is_main_process:
        if (folder / META_NAME).is_file():
            old = json.loads((folder / META_NAME).read_text())
            diff = sorted(k for k in meta if old.get(k) != meta[k])
            if diff:
                raise ValueError(f"output_dir: {str(folder)!r} holds a trajectory store with other settings "
                                 f"({', '.join(f'{k}: {old.get(k)!r} != {meta[k]!r}' for k in diff)}); pass another "
                                 f"folder or the same settings to resume.")
        else:
            example = _flatten(conditions([0])[0])
            spec = {k: (tuple(v.shape[1:]), "int64" if not v.is_floating_point() else "float16")
                    for k, v in example.items()}
            TrajectoryStore.create(folder, meta, spec)
    state.wait_for_everyone()
    store = TrajectoryStore(folder, mode="r+")
    todo = store.pending(state.process_index, state.num_processes)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc="trajectories", unit="traj", disable=not (progress and state.is_main_process))
    for start in range(0, len(todo), batch_size):
        ids = todo[start:start + batch_size]
        draws = [trajectory_inputs(i, seed, bundle.sample_shape, omega_range) for i in ids]
        noise = torch.stack([d[0] for d in draws]).to(device)
        omega = torch.tensor([d[1] for d in draws], device=device)
        cond, uncond = conditions(ids)
        scheduler = copy.deepcopy(base_scheduler)
        scheduler.set_timesteps(num_inference_steps, device=device)
        model = _RecordingCFG(den, cond, uncond, omega)
        gens = [seeded_generator(seed, i, 2) for i in ids]  # stochastic solvers: per-trajectory step noise
        with torch.no_grad():
            sample_loop(model, noise * scheduler.init_noise_sigma, scheduler,
                        step_kwargs=FastGenPipelineMixin._step_kwargs(scheduler, gens, 0.0))
        if len(model.record) != num_inference_steps:
            raise RuntimeError(f"the solver ran {len(model.record)} network steps, expected {num_inference_steps} "
                               f"(pick a one-evaluation-per-step solver).")
        x_t = torch.stack([r[0] for r in model.record], dim=1)
        target = torch.stack([r[2] for r in model.record], dim=1)
        t = torch.tensor([r[1] for r in model.record]).expand(len(ids), -1)
        store.write(ids, x_t, t, target, omega, cond)
        bar.update(len(ids))
    bar.close()
    state.wait_for_everyone()
    return {"output_dir": str(folder), "num_trajectories": num_trajectories, "num_steps": num_inference_steps,
            "collected": len(todo), "complete": TrajectoryStore(folder).complete}


# ---------------------------------------------------------------------- the method
@dataclass
class AGDConfig:
    """AGD options (spec §5.1).

    Args:
        source: ``"trajectories"`` (AGD: rows of a :class:`TrajectoryStore`) or ``"forward_noised"`` (the
            classic baseline on forward-noised real data; needs ``dataset``).
        trajectories: the store folder (``source="trajectories"``; opened, and checked, when the method is built).
        omega_range: forward-noised baseline: ``omega ~ U[low, high]`` per row.
        train_time: forward-noised baseline: inclusive timestep range of ``t``.
        variant, width, heads, fourier_dim, fourier_std, zero_init, adapter_seed: the adapter
            (:meth:`fastgen.adapters.GuidanceAdapter.for_model`).
        eval_guidance_scale: omega of in-training evaluations (default: the run's ``guidance_scale``).
        eval_steps: solver steps of in-training evaluations (one evaluation each).
    """

    source: str = "trajectories"
    trajectories: str | None = None
    omega_range: tuple[float, float] = (1.0, 8.0)
    train_time: tuple[int, int] = (0, 999)
    variant: str | None = None
    width: int | None = None
    heads: int | None = None
    fourier_dim: int = 32
    fourier_std: float = 1.0
    zero_init: bool = True
    adapter_seed: int = 0
    eval_guidance_scale: float | None = None
    eval_steps: int = 20

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}.")
        if self.source == "trajectories" and not self.trajectories:
            raise ValueError("trajectories: source='trajectories' needs the folder of a trajectory store "
                             "(fastgen distill collect-trajectories).")
        self.omega_range = _check_omega_range("omega_range", self.omega_range)
        t = self.train_time
        if (not isinstance(t, (tuple, list)) or len(t) != 2 or any(isinstance(v, bool) or not isinstance(v, int)
                                                                  for v in t) or not 0 <= t[0] <= t[1]):
            raise ValueError(f"train_time must be a pair of integer timesteps (low, high), got {t!r}.")
        self.train_time = (int(t[0]), int(t[1]))
        _positive("eval_steps", self.eval_steps)


class AGD(DistillMethod):
    """Adapter guidance distillation (Jensen & Sadat, arXiv:2503.07274): train a :class:`GuidanceAdapter` on the
    frozen base so that one evaluation at ``omega`` reproduces the base's CFG output at ``omega``.

    Args:
        teacher: the :class:`~fastgen.training.teacher.Teacher` bundle (the base; frozen here).
        config: :class:`AGDConfig`; keyword options override its fields.

    The adapter is the only trainable network (optimiser group ``"generator"``, no critic); checkpoints
    and the exported ``student/`` folder hold the adapter alone (``pipe.load_guidance_adapter(folder)``).
    """

    name = "agd"
    config_class = AGDConfig

    def __init__(self, teacher, config: AGDConfig | None = None, **options):
        super().__init__()
        from ..adapters import GuidanceAdapter

        known = {f.name for f in fields(self.config_class)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown {self.name} options {unknown}; accepted: {sorted(known)}.")
        if config is None:
            config = self.config_class(**options)
        elif options:
            config = type(config)(**{**{f.name: getattr(config, f.name) for f in fields(config)}, **options})
        self.config = config
        if not (hasattr(teacher, "denoiser") and hasattr(teacher, "pipeline")):
            raise TypeError("teacher must be a fastgen.training.teacher.Teacher bundle (load_teacher).")
        self.needs_real_data = config.source == "forward_noised"
        den = teacher.denoiser
        network = den.model
        network.requires_grad_(False).eval()
        self.__dict__["bundle"] = teacher
        self.__dict__["denoiser"] = den
        self.set_teacher(den)
        self.adapter = GuidanceAdapter.for_model(network, variant=config.variant, width=config.width,
                                                 heads=config.heads, fourier_dim=config.fourier_dim,
                                                 fourier_std=config.fourier_std, zero_init=config.zero_init,
                                                 seed=config.adapter_seed).attach(network)
        self.store = None
        if config.source == "trajectories":
            store = TrajectoryStore(config.trajectories)
            if not store.complete:
                raise ValueError(f"trajectories: the store {config.trajectories!r} is incomplete "
                                 f"({int(store.done().sum())}/{store.num_trajectories} trajectories); run "
                                 f"collect-trajectories again with the same options to finish it (it resumes).")
            if tuple(store.sample_shape) != tuple(teacher.sample_shape):
                raise ValueError(f"trajectories: the store holds {store.sample_shape} samples, the base expects "
                                 f"{tuple(teacher.sample_shape)}.")
            if store.meta.get("prediction_type") != den.prediction_type:
                raise ValueError(f"trajectories: the store's targets are {store.meta.get('prediction_type')!r} "
                                 f"outputs, the base predicts {den.prediction_type!r}.")
            self.store = store
        elif getattr(teacher, "num_classes", None) is None:
            raise ValueError("source: the forward-noised baseline needs class labels of the real data "
                             "(class-conditional bases only).")

    def train(self, mode: bool = True) -> "AGD":
        super().train(mode)
        self.denoiser.model.eval()  # the frozen base stays in eval mode
        return self

    # ------------------------------------------------------------------ contract
    def optimizer_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        return {"generator": list(self.adapter.parameters())}

    def student(self) -> torch.nn.Module:
        return self.adapter

    def critic_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        raise RuntimeError("AGD has no critic: its only optimiser group is 'generator'.")

    def _prediction(self, x_t, t, cond, omega) -> torch.Tensor:
        with self.adapter.guidance_scale(omega):
            return self.denoiser(x_t, t, cond)

    def _rows(self, batch: Batch) -> dict[str, Any]:
        """``x_t``, ``t``, ``cond``, ``omega`` and the CFG ``target`` of one micro-batch on the batch's device."""
        device, g, n = batch.noise.device, batch.generator, batch.batch_size
        if self.store is not None:
            rows = self.store.sample(n, g)
            dtype = self.denoiser.model.dtype
            cond = _to_device(rows["cond"], device, dtype)
            return {"x_t": rows["x_t"].to(device, dtype), "t": rows["t"].to(device), "cond": cond,
                    "omega": rows["omega"].to(device), "target": rows["target"].to(device)}
        if batch.real is None or batch.real_labels is None:
            raise ValueError("the forward-noised baseline needs labelled real data (Batch.real, Batch.real_labels).")
        x0, labels = batch.real.to(device), batch.real_labels.to(device)
        m = x0.shape[0]
        lo, hi = self.config.train_time
        t = torch.randint(lo, hi + 1, (m,), generator=g, device=g.device).to(device)
        eps = torch.randn(x0.shape, generator=g, device=g.device).to(device, x0.dtype)
        a, s = self.denoiser.alpha_sigma(t, like=x0)
        x_t = a * x0 + s * eps
        wlo, whi = self.config.omega_range
        omega = (wlo + (whi - wlo) * torch.rand(m, generator=g, device=g.device)).to(device)
        bundle = self.bundle
        cond, uncond = bundle.cond(labels), bundle.uncond(labels)
        self.adapter.enabled = False  # the target is the base's own CFG
        try:
            with torch.no_grad():
                target = cfg_output(self.denoiser, x_t, t, cond, uncond, omega)
        finally:
            self.adapter.enabled = True
        return {"x_t": x_t, "t": t, "cond": cond, "omega": omega, "target": target}

    def generator_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        r = self._rows(batch)
        pred = self._prediction(r["x_t"], r["t"], r["cond"], r["omega"])
        loss = F.mse_loss(pred.float(), r["target"].float())  # fp32 loss (spec §5.2)
        return {"loss": loss, "mse": loss.detach()}

    # ------------------------------------------------------------------ sampling (evaluation)
    @torch.no_grad()
    def sample(self, noise: torch.Tensor, labels: Any, generator=None) -> torch.Tensor:
        """One-evaluation-per-step sampling with the adapter at ``eval_guidance_scale`` (the base's scheduler)."""
        from ..sampling import sample_loop
        from .students import split_conditions

        bundle = self.bundle
        omega = self.config.eval_guidance_scale
        omega = float(bundle.guidance_scale if omega is None else omega)
        cond, _ = split_conditions(labels, bundle.null_label)
        scheduler = copy.deepcopy(bundle.scheduler)
        scheduler.set_timesteps(self.config.eval_steps, device=noise.device)
        model = GuidedDenoiser(self.denoiser, None, cond, None)
        with self.adapter.guidance_scale(omega):
            return sample_loop(model, noise * scheduler.init_noise_sigma, scheduler).latents


def _to_device(value, device, dtype):
    """Condition tensors to ``device``; floating ones (prompt embeddings, stored in fp16) to the network's dtype."""
    if isinstance(value, dict):
        return {k: _to_device(v, device, dtype) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype) if value.is_floating_point() else value.to(device)
    return value
