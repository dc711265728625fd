"""``fastgen fit-linear-ag``: fit LinearAG's per-step coefficients on calibration trajectories of a pipeline."""
from __future__ import annotations

from ..linear_ag_fit import LinearAGFitConfig
from .command import Command


def run(config: LinearAGFitConfig) -> dict:
    from ..linear_ag_fit import fit_linear_ag_for_model

    return fit_linear_ag_for_model(config)


def summary(r: dict) -> str:
    return (f"wrote {r['output']}: {len(r['replaced_steps'])} replaced steps, worst held-out R^2 "
            f"{r['worst_r2']:.4f} ({r['seconds']} s)")


COMMANDS = [Command(
    "fit-linear-ag", LinearAGFitConfig, run, summary=summary,
    help="fit LinearAG coefficients (Castillo et al. 2023) for a model, step count and guidance scale",
    description="Run CFG calibration trajectories of a FastGen pipeline, fit the per-step affine coefficients that "
                "predict the unconditional noise prediction from past ones, and save them as JSON (next to a model "
                "folder, where guidance='linear-ag' finds them; under ./linear_ag/ for builtin models).")]
