"""Fit LinearAG coefficients for a model given by name or folder (``fastgen fit-linear-ag``; also from Python).

Castillo et al., *Adaptive Guidance: Training-free Acceleration of Conditional Diffusion Models*
(arXiv:2312.12487), LinearAG: :func:`fastgen.guidance.calibrate.fit_linear_ag` does the fitting; this
module loads the model, builds the calibration conditioning and decides where the file goes. It imports
the guidance package (and torch) only when it runs, so the CLI and recipe files can read the config cheaply.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


@dataclass
class LinearAGFitConfig:
    """Options of :func:`fit_linear_ag_for_model` (and of ``fastgen fit-linear-ag``); field names are
    :func:`~fastgen.guidance.calibrate.fit_linear_ag`'s arguments."""

    model: str = field(default="builtin:digits", metadata={"help": "'builtin:digits' or a diffusers folder"})
    num_inference_steps: int = field(default=20, metadata={
        "help": "sampling steps the coefficients are for", "aliases": ["--steps"]})
    guidance_scale: float = field(default=3.0, metadata={
        "help": "guidance scale the coefficients are for (> 1)", "aliases": ["--scale"]})
    num_samples: int = field(default=256, metadata={"help": "calibration samples", "aliases": ["--n"]})
    replace_fraction: float = field(default=0.5, metadata={
        "help": "share of the steps whose unconditional pass is replaced (steps 1 .. int(f*N)-1)"})
    solver: Optional[str] = field(default=None, metadata={
        "help": "the pipeline's scheduler if unset; else any solver the pipelines accept (name, USF preset, "
                "schedule JSON)"})
    prompt: Optional[list[str]] = field(default=None, metadata={"help": "calibration prompts (text-to-image models)"})
    seed: int = field(default=1_000_000, metadata={"help": "first calibration seed"})
    batch_size: int = field(default=128, metadata={"help": "samples per batch"})
    device: str = field(default="cpu", metadata={"help": "torch device"})
    out: Optional[str] = field(default=None, metadata={
        "help": "output JSON path (default: <model folder>/linear_ag/<solver>_steps<N>_scale<w>.json, where "
                "guidance='linear-ag' finds it; for builtin models the same name under ./linear_ag/)"})


def fit_linear_ag_for_model(config: LinearAGFitConfig | None = None, **overrides) -> dict:
    """Load ``config.model``, fit LinearAG's coefficients, write them; returns a summary record."""
    config = LinearAGFitConfig(**overrides) if config is None else config
    if config.out is not None and not str(config.out).lower().endswith(".json"):
        raise ValueError(f"out must be a .json path, got {config.out!r}.")
    if config.out is not None:
        from .generate import check_output_path

        check_output_path(config.out, (".json",), name="out")
    from .builtin import load_pipeline
    from .guidance.adaptive import default_coefficients_path
    from .guidance.calibrate import fit_linear_ag, save_linear_ag, worst_r2

    pipe = load_pipeline(config.model, device=config.device)
    pipe.set_progress_bar_config(disable=True)
    call_kwargs = None
    if not hasattr(pipe, "num_classes"):
        if not config.prompt:
            raise ValueError("prompt is required for text-to-image models (calibration prompts).")
        prompts = list(config.prompt)
        call_kwargs = lambda first, count: {"prompt": [prompts[(first + j) % len(prompts)] for j in range(count)]}  # noqa: E731
    elif config.prompt:
        raise ValueError("prompt applies to text-to-image models only; class-conditional models cycle through classes.")
    start = time.perf_counter()
    record = fit_linear_ag(pipe, num_inference_steps=config.num_inference_steps,
                           guidance_scale=config.guidance_scale, num_samples=config.num_samples,
                           replace_fraction=config.replace_fraction, solver=config.solver, seed=config.seed,
                           batch_size=config.batch_size, call_kwargs=call_kwargs)
    out = config.out
    if out is None and config.model.startswith("builtin:"):  # never write into the installed package
        out = default_coefficients_path(Path.cwd(), record["scheduler"], record["num_inference_steps"],
                                        record["guidance_scale"])
    path = save_linear_ag(record, out, pipe)
    return {"output": str(path), "steps": config.num_inference_steps, "scale": config.guidance_scale,
            "scheduler": record["scheduler"], "replaced_steps": sorted(int(k) for k in record["steps"]),
            "worst_r2": worst_r2(record), "seconds": round(time.perf_counter() - start, 2)}


__all__ = ["LinearAGFitConfig", "fit_linear_ag_for_model"]
