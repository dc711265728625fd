"""Fitting LinearAG coefficients on calibration CFG trajectories of a FastGen pipeline."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from ..builtin import model_label
from .adaptive import LINEAR_AG_FORMAT, LINEAR_AG_REGRESSORS, default_coefficients_path, fit_linear_ag_coefficients
from .cfg import CFG


class _RecordingCFG(CFG):
    """CFG that records the noise predictions of both branches at every guided step (calibration only)."""

    def begin_run(self, num_inference_steps: int, start_step: int = 0, batch_size=None, **info) -> None:
        self.records: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._context = None

    def set_model_input(self, context) -> None:
        self._context = context

    def forward(self, pred_cond, pred_uncond=None):
        if pred_uncond is not None and self._context is not None:
            self.records[int(self._step)] = (self._context.to_eps(pred_cond).float().cpu(),
                                             self._context.to_eps(pred_uncond).float().cpu())
        return super().forward(pred_cond, pred_uncond)


def fit_linear_ag(
    pipe,
    *,
    num_inference_steps: int = 20,
    guidance_scale: float = 3.0,
    num_samples: int = 256,
    replace_fraction: float = 0.5,
    solver=None,
    seed: int = 1_000_000,
    batch_size: int = 128,
    call_kwargs=None,
    holdout: float = 0.2,
) -> dict[str, Any]:
    """Run ``num_samples`` CFG trajectories of ``pipe`` and fit LinearAG's coefficients (Castillo et al. 2023).

    Steps 1 … ``int(replace_fraction * N) − 1`` get coefficients (step 0 always evaluates both branches).
    ``call_kwargs(first, count) -> dict`` gives the conditioning of samples ``first … first+count-1``; by
    default class-conditional pipelines cycle through the classes and text pipelines need it. Calibration
    seeds start at ``seed`` (keep them apart from evaluation seeds). Returns the JSON-ready record.
    """
    for name, value in (("num_inference_steps", num_inference_steps), ("num_samples", num_samples),
                        ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or guidance_scale <= 1:
        raise ValueError(f"guidance_scale must be a number > 1 (LinearAG replaces CFG's unconditional pass), got {guidance_scale!r}.")
    if not 0 < replace_fraction <= 1:
        raise ValueError(f"replace_fraction must be in (0, 1], got {replace_fraction!r}.")
    last = int(replace_fraction * num_inference_steps) - 1
    if last < 1:
        raise ValueError(f"replace_fraction {replace_fraction} of {num_inference_steps} steps replaces no step; "
                         f"use more steps or a larger fraction.")
    if call_kwargs is None:
        if not hasattr(pipe, "num_classes"):
            raise ValueError("call_kwargs is required for text pipelines: fn(first, count) -> {'prompt': [...]}.")
        call_kwargs = lambda first, count: {"class_labels": [(first + j) % pipe.num_classes for j in range(count)]}  # noqa: E731
    recorder = _RecordingCFG(guidance_scale=float(guidance_scale))
    eps_c: list[list[torch.Tensor]] = [[] for _ in range(num_inference_steps)]
    eps_u: list[list[torch.Tensor]] = [[] for _ in range(num_inference_steps)]
    scheduler_name = None
    for first in range(0, num_samples, batch_size):
        count = min(batch_size, num_samples - first)
        pipe(**call_kwargs(first, count), num_inference_steps=num_inference_steps, guidance=recorder,
             guidance_scale=float(guidance_scale), solver=solver, seed=seed + first, output_type="latent")
        for step, (c, u) in recorder.records.items():
            eps_c[step].append(c)
            eps_u[step].append(u)
    scheduler_name = _scheduler_name(pipe, solver)
    eps_c = [torch.cat(x) for x in eps_c]
    eps_u = [torch.cat(x) for x in eps_u]
    steps = list(range(1, last + 1))
    coefs, r2_fit, r2_held = fit_linear_ag_coefficients(eps_c, eps_u, steps, holdout=holdout)
    return {
        "format": LINEAR_AG_FORMAT,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": float(guidance_scale),
        "scheduler": scheduler_name,
        "space": "eps",
        "regressors": list(LINEAR_AG_REGRESSORS),
        "steps": {str(k): v for k, v in coefs.items()},
        "r2_fit": {str(k): v for k, v in r2_fit.items()},
        "r2_heldout": {str(k): v for k, v in r2_held.items()},
        "num_samples": num_samples,
        "holdout": holdout,
        "seed": seed,
        "model": model_label(getattr(pipe, "name_or_path", "")),
    }


def _scheduler_name(pipe, solver) -> str:
    from ..solvers import resolve_solver
    return type(resolve_solver(solver, pipe.scheduler)).__name__


def save_linear_ag(record: dict[str, Any], out: str | Path | None, pipe=None) -> Path:
    """Write a fitted record as JSON (default: next to the model, where ``guidance="linear-ag"`` looks)."""
    if out is None:
        folder = getattr(pipe, "name_or_path", None) if pipe is not None else None
        if not folder or not Path(folder).is_dir():
            raise ValueError("out is required when the pipeline has no local folder to write next to.")
        out = default_coefficients_path(folder, record["scheduler"], record["num_inference_steps"],
                                        record["guidance_scale"])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    return out


def worst_r2(record: dict[str, Any]) -> float:
    values = list(record.get("r2_heldout", {}).values()) or list(record.get("r2_fit", {}).values())
    return min(values) if values else math.nan
