"""Evaluation runs described by options: ``fastgen eval fid`` and ``fastgen eval ref`` (also usable from Python).

A light module (no torch at import), so that building the CLI parser stays fast; the work happens in
:mod:`fastgen.metrics`.

:class:`FidConfig` and :class:`ReferenceConfig` hold the options and their defaults (the CLI parses them from
these dataclasses; recipe files and benchmarks build the same objects); :func:`fid` and :func:`reference` run
them through :func:`fastgen.metrics.evaluate_pipeline` / :func:`~fastgen.metrics.evaluate_images` /
:func:`~fastgen.metrics.compute_reference` and return JSON-ready records. Validation lives in those
functions and in the pipelines (one message, one place); nothing here checks values.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

__all__ = ["FidConfig", "ReferenceConfig", "fid", "reference"]

_FEATURES_HELP = "feature extractor: digits, inception (needs fastgen[inception] and --inception-weights) or clip"


@dataclass
class FidConfig:
    """Options of :func:`fid` (``fastgen eval fid``)."""

    fake: str = field(metadata={
        "help": "fake images: an image folder, or a model to sample (builtin:digits or a pipeline folder)"})
    real: str = field(default="builtin:digits", metadata={
        "help": "reference: builtin:digits (the shipped train-split statistics), builtin:digits:<train|heldout|"
                "features|all> (computed from that split), a statistics .npz or an image folder"})
    features: str = field(default="digits", metadata={"help": _FEATURES_HELP})
    inception_weights: Optional[str] = field(default=None, metadata={
        "help": "path of weights-inception-2015-12-05-6726825d.pth (inception features)"})
    clip_model: Optional[str] = field(default=None, metadata={"help": "CLIP folder or hub id (clip features)"})
    n: int = field(default=1000, metadata={"help": "samples to draw from a model (ignored for image folders)"})
    steps: Optional[int] = field(default=None, metadata={
        "help": "solver steps when sampling (num_inference_steps; default 20); a distilled student runs its own"})
    guidance: Optional[str] = field(default=None, metadata={
        "help": "guidance method when sampling: cfg (default), apg, ag, linear-ag, or 'none' for the conditional "
                "model alone; a distilled student runs without guidance"})
    scale: Optional[float] = field(default=None, metadata={
        "help": "guidance scale (default 3; ignored with --guidance none)"})
    solver: Optional[str] = field(default=None, metadata={
        "help": "the pipeline's scheduler if unset; else a diffusers solver name (dpmsolver++, unipc, ...), a USF "
                "preset (usf-default, ...) or a schedule JSON path (e.g. fastgen/assets/digits-schedules/nfe5.json)"})
    teleport: Optional[str] = field(default=None, metadata={
        "help": "Gaussian statistics (.safetensors/.npz from `fastgen teleport-stats`) for analytical teleportation"})
    teleport_fraction: Optional[float] = field(default=None, metadata={
        "help": "share of steps replaced by the teleport (default: the pipeline's)"})
    seed: int = field(default=0, metadata={"help": "seed of sample 0; sample i uses seed + i and class i mod num_classes"})
    batch_size: int = field(default=250, metadata={"help": "images per sampling/feature batch"})
    kid_subsets: int = field(default=100, metadata={"help": "KID subsets"})
    kid_subset_size: int = field(default=1000, metadata={"help": "KID subset size (capped at the set sizes)"})
    pr_k: int = field(default=3, metadata={"help": "k of the k-NN manifolds for precision/recall"})
    knn_metrics: bool = field(default=True, metadata={
        "help": "compute KID and precision/recall (they need the raw features of both sets)"})
    grid: Optional[str] = field(default=None, metadata={"help": "write a PNG grid of the first scored images here"})
    grid_count: int = field(default=64, metadata={"help": "images in the grid"})
    attention: str = field(default="auto", metadata={"help": "attention backend: auto, sdpa or xformers"})
    device: Optional[str] = field(default=None, metadata={
        "help": "torch device (default: accelerate's device for this process)"})
    progress: bool = field(default=True, metadata={"help": "show progress bars on stderr"})


@dataclass
class ReferenceConfig:
    """Options of :func:`reference` (``fastgen eval ref``)."""

    data: str = field(metadata={"help": "image folder or builtin:digits[:train|heldout|features|all]"})
    out: str = field(metadata={"help": "output .npz path"})
    features: str = field(default="digits", metadata={"help": _FEATURES_HELP})
    inception_weights: Optional[str] = field(default=None, metadata={
        "help": "path of weights-inception-2015-12-05-6726825d.pth (inception features)"})
    clip_model: Optional[str] = field(default=None, metadata={"help": "CLIP folder or hub id (clip features)"})
    store_features: bool = field(default=True, metadata={
        "help": "also store the raw features (float32) for KID and precision/recall"})
    batch_size: int = field(default=256, metadata={"help": "images per feature batch"})
    device: Optional[str] = field(default=None, metadata={
        "help": "torch device (default: accelerate's device for this process)"})
    progress: bool = field(default=True, metadata={"help": "show progress bars on stderr"})


def _state_and_extractor(config):
    from .metrics.evaluate import resolve_state
    from .metrics.features import get_extractor

    state, device = resolve_state(device=config.device)
    return state, device, get_extractor(config.features, device=device, inception_weights=config.inception_weights,
                                        clip_model=config.clip_model)


def _is_model(spec: str) -> bool:
    """``fake`` names a model (``builtin:<name>`` or a pipeline folder) rather than an image folder."""
    return spec.startswith("builtin:") or (Path(spec) / "model_index.json").is_file()


def fid(config: FidConfig | None = None, **overrides) -> dict:
    """Score ``config.fake`` (images, or samples of a model) against ``config.real``; returns the record
    (:meth:`fastgen.metrics.EvalResult.to_dict` plus the sampling options)."""
    from .metrics.evaluate import evaluate_images, evaluate_pipeline

    config = FidConfig(**overrides) if config is None else config
    if _is_model(config.fake):  # sampling options are checked before anything loads
        from .generate import check_sampling_options
        from .pipelines.common import check_positive_int

        check_positive_int("n", config.n)
        check_sampling_options(steps=config.steps, guidance=config.guidance, guidance_scale=config.scale,
                               teleport=config.teleport, teleport_fraction=config.teleport_fraction,
                               scale_name="scale")
    state, device, extractor = _state_and_extractor(config)
    common = dict(accelerator=state, extractor=extractor, reference=config.real, batch_size=config.batch_size,
                  grid=config.grid, grid_count=config.grid_count, progress=config.progress,
                  knn_metrics=config.knn_metrics, kid_subsets=config.kid_subsets,
                  kid_subset_size=config.kid_subset_size, pr_k=config.pr_k)
    if not _is_model(config.fake):
        result = evaluate_images(config.fake, **common)
        return {**result.to_dict(), "real": config.real, "fake": config.fake, "device": str(device)}
    from .builtin import load_pipeline
    from .generate import plan_sampling

    pipe = load_pipeline(config.fake, config.attention, str(device))
    pipe.set_progress_bar_config(disable=True)
    plan = plan_sampling(pipe, steps=config.steps, guidance=config.guidance, guidance_scale=config.scale,
                         solver=config.solver, teleport=config.teleport, teleport_fraction=config.teleport_fraction)
    if plan.student:
        title = f"{config.fake}  distilled student, {pipe.steps_label}"
    else:
        title = f"{config.fake}  {plan.solver}, {plan.steps} steps, {plan.guidance} w={plan.scale:g}"
    result = evaluate_pipeline(pipe, config.n, seed=config.seed, grid_title=title, **common, **plan.call)
    return {**result.to_dict(), "real": config.real, "fake": config.fake, "steps": plan.steps,
            "guidance": plan.guidance, "guidance_scale": plan.scale, "solver": plan.solver,
            "teleport": config.teleport, "seed": config.seed, "device": str(device)}


def reference(config: ReferenceConfig | None = None, **overrides) -> dict:
    """Compute the reference statistics of ``config.data`` and write them to ``config.out`` (main process)."""
    from .metrics.evaluate import compute_reference

    config = ReferenceConfig(**overrides) if config is None else config
    if not str(config.out).endswith(".npz"):
        raise ValueError(f"out must be a .npz path, got {config.out!r}.")
    t0 = time.perf_counter()
    state, _, extractor = _state_and_extractor(config)
    ref = compute_reference(config.data, extractor, accelerator=state, batch_size=config.batch_size,
                            store_features=config.store_features, progress=config.progress)
    if state.is_main_process:
        ref.save(config.out)
    return {"out": str(config.out), "n": ref.n, "extractor": ref.extractor, "resize_mode": ref.resize_mode,
            "num_features": ref.num_features, "features_stored": ref.features is not None,
            "seconds": round(time.perf_counter() - t0, 3)}
