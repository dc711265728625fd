"""S³ schedule search for one model and NFE, end to end (``fastgen search-schedule``; also from Python).

:class:`SearchScheduleConfig` holds the options and defaults; :func:`search_schedule` validates them,
loads the model, builds the search space from its noise schedule, runs :func:`fastgen.solvers.search.search`
(resumable: ``OUT.state.json`` and ``OUT.log.jsonl``), re-scores the top candidates by digits FID on
disjoint seeds and writes the best schedule. Liu et al., *A Unified Sampling Framework for Solver
Searching of Diffusion Probabilistic Models* (ICLR 2024, arXiv:2312.07243).

The search itself lives in :mod:`fastgen.solvers.search`, its fitness in :mod:`fastgen.solvers.evaluate`;
this module imports them (and torch) only when it runs, so the CLI and recipe files can read the config cheaply.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

BUILTIN_MODEL = "builtin:digits"
DIGITS_MODELS = ("builtin:digits", "builtin:digits-small")  # 16x16 digits: the digits-feature FID applies
METRICS = ("auto", "fid", "rms")
MAX_NFE = 20


@dataclass
class SearchScheduleConfig:
    """Options of :func:`search_schedule` (and of ``fastgen search-schedule``)."""

    nfe: int = field(metadata={"help": "network evaluations per sample (guidance excluded), 1..20"})
    out: str = field(metadata={"help": "where to write the best schedule (.json); the search state goes next to it"})
    model: str = field(default=BUILTIN_MODEL, metadata={"help": "'builtin:digits' or a diffusers folder"})
    budget: int = field(default=40, metadata={"help": "true evaluations (model runs) of candidate schedules"})
    metric: str = field(default="auto", metadata={
        "help": "search fitness: 'fid' (digits features; the built-in digits models), 'rms' (RMS distance of the "
                "images to a high-NFE DPM-Solver++ reference from the same noise: solver accuracy; the top candidates "
                "are re-ranked by it on disjoint seeds); 'auto' = fid for the digits models, rms otherwise"})
    samples: int = field(default=500, metadata={"help": "samples per evaluation (fixed seeds and labels)"})
    reference_steps: int = field(default=50, metadata={"help": "steps of the reference solver for metric rms"})
    data_mean: str = field(default="auto", metadata={
        "help": "Gaussian statistics file whose mean enables the 'average_x0' first step; 'auto' = the shipped "
                "digits statistics for builtin:digits, 'none' = leave that option out"})
    initial: list[str] = field(default_factory=list, metadata={
        "help": "schedule JSONs to evaluate with the seed candidates"})
    scale: float = field(default=3.0, metadata={"help": "CFG guidance scale used while searching"})
    teleport: Optional[str] = field(default=None, metadata={
        "help": "Gaussian statistics file: search schedules whose first step is this teleport (its target is "
                "searched too)"})
    rescore: int = field(default=3, metadata={
        "help": "re-score this many top candidates on disjoint seeds (by the search metric; digits FID recorded too)"})
    rescore_samples: int = field(default=1000, metadata={"help": "samples for the re-scoring"})
    seed: int = field(default=0, metadata={"help": "search seed"})
    device: str = field(default="cpu", metadata={"help": "torch device"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar on stderr"})


def _check(config: SearchScheduleConfig) -> str:
    """Everything checkable before the model loads; returns the resolved metric."""
    from .pipelines.common import check_positive_int

    for name in ("nfe", "budget", "samples", "reference_steps", "rescore", "rescore_samples"):
        check_positive_int(name, getattr(config, name))
    if config.nfe > MAX_NFE:
        raise ValueError(f"nfe must be in 1..{MAX_NFE} for a schedule search, got {config.nfe}.")
    if not str(config.out).endswith(".json"):
        raise ValueError(f"out must be a .json path, got {config.out!r}.")
    if config.metric not in METRICS:
        raise ValueError(f"metric must be one of {list(METRICS)}, got {config.metric!r}.")
    digits = config.model in DIGITS_MODELS
    metric = ("fid" if digits else "rms") if config.metric == "auto" else config.metric
    if metric == "fid" and not digits:
        raise ValueError(f"metric fid scores with the digits feature network, so it needs model {' or '.join(DIGITS_MODELS)}; "
                         "use metric rms for other models.")
    if not (isinstance(config.scale, (int, float)) and abs(config.scale) < float("inf")):
        raise ValueError(f"scale must be a finite number, got {config.scale!r}.")
    from .generate import check_output_path

    check_output_path(config.out, (".json",), name="out")
    return metric


# Options that change the search records; a resumed search must use the same ones (budget may grow).
RESUME_OPTIONS = ("model", "metric", "samples", "reference_steps", "data_mean", "initial", "scale", "teleport", "seed")


def _resume_options(config: SearchScheduleConfig, metric: str) -> dict:
    options = {name: getattr(config, name) for name in RESUME_OPTIONS}
    options["metric"] = metric
    options["initial"] = [str(p) for p in config.initial]
    return options


def _data_mean(config: SearchScheduleConfig):
    """The data mean for the ``average_x0`` first step (rounded: it is stored inline in every candidate)."""
    path = config.data_mean
    if path == "auto":
        if config.model not in DIGITS_MODELS:
            return None
        from .builtin import asset_path

        path = asset_path("digits-teleport/stats.safetensors")
    if path == "none":
        return None
    from .teleport import GaussianStats

    return GaussianStats.load(path).mean.double().mul(1e4).round().div(1e4).tolist()


def search_schedule(config: SearchScheduleConfig | None = None, **overrides) -> dict:
    """Run the S³ search of ``config`` and write the best schedule to ``config.out``; returns a record."""
    config = SearchScheduleConfig(**overrides) if config is None else config
    metric = _check(config)
    from .solvers.search import read_state

    options = _resume_options(config, metric)
    state_path = str(config.out) + ".state.json"
    # a state from other options (or not a state) is refused here, before anything loads or is written
    read_state(state_path, {"nfe": config.nfe, "teleport_steps": int(config.teleport is not None), **options})
    Path(config.out).parent.mkdir(parents=True, exist_ok=True)  # the state and the log go next to out from the start
    from .teleport import GaussianStats
    from .solvers.usf import SolverSchedule

    initial = [SolverSchedule.load(path) for path in config.initial]
    stats = GaussianStats.load(config.teleport) if config.teleport is not None else None
    data_mean = _data_mean(config)

    from .builtin import load_pipeline
    from .solvers.evaluate import FIDEvaluator, ScheduleEvaluator
    from .solvers.search import SearchSpace, search

    pipe = load_pipeline(config.model, device=config.device)
    pipe.set_progress_bar_config(disable=True)
    if metric == "fid":
        ev = FIDEvaluator(pipe, samples=config.samples, scale=config.scale, teleport=stats)
    else:
        ev = ScheduleEvaluator(pipe, samples=config.samples, reference_steps=config.reference_steps,
                               scale=config.scale, teleport=stats, fid=config.model in DIGITS_MODELS)
    ns = ev.noise_schedule
    space = SearchSpace(nfe=config.nfe, t_max=ns.t_max, t_min=ns.t_min, lambda_of=ns.lambda_,
                        t_of_lambda=ns.t_from_lambda, teleport_steps=int(stats is not None), data_mean=data_mean)
    out = Path(config.out)
    progress = None
    if config.progress:
        from tqdm.auto import tqdm

        progress = lambda **kw: tqdm(desc=f"S3 nfe={config.nfe}", unit="eval", file=sys.stderr, **kw)  # noqa: E731
    t0, c0 = time.time(), time.process_time()
    records = search(space, ev, budget=config.budget, state_path=state_path, log_path=str(out) + ".log.jsonl",
                     seed=config.seed, progress=progress, initial=initial, options=options)
    best = ev.rescore(records[: config.rescore], config.rescore_samples)
    best.meta.update({"search": {
        "evaluations": len(records), "budget": config.budget, "samples": config.samples, "metric": ev.name,
        "reference": (f"dpmsolver++-2m@{config.reference_steps}" if metric == "rms"
                      else "builtin:digits train statistics (fastgen/assets/digits-reference/train_stats.npz)"),
        "guidance_scale": config.scale, "teleport": config.teleport,
        "eval_seconds": round(sum(r["seconds"] for r in records), 1),
        "cpu_seconds_this_run": round(time.process_time() - c0, 1),
        "wall_seconds_this_run": round(time.time() - t0, 1)}})
    best.name = f"s3-nfe{config.nfe}" + ("-teleport" if stats is not None else "")
    best.save(out)
    return {"out": str(out), "nfe": best.nfe, **best.meta["search"], "search_metric": best.meta.get("search_metric"),
            "fid": best.meta.get("fid"), "rms_to_reference": best.meta.get("rms_to_reference"),
            "rescore_samples": config.rescore_samples}


__all__ = ["SearchScheduleConfig", "search_schedule"]
