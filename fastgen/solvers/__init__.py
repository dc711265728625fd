"""Solvers: which diffusers-protocol scheduler advances the sample each step.

The sampling loop accepts any ``diffusers.SchedulerMixin`` (``set_timesteps``, ``scale_model_input``,
``step``); ``resolve_solver`` maps the pipeline's ``solver=`` argument to one, built from the
pipeline's own scheduler config so the training noise schedule is kept. Besides the diffusers solvers
of ``SOLVER_REGISTRY``, ``solver=`` takes a USF preset name (``"usf-dpmsolver++-2m"``, ``"usf-default"``,
...), a :class:`SolverSchedule` or a path to a schedule JSON; those run in a :class:`USFScheduler`
(S³, Liu et al. 2024, arXiv:2312.07243).
"""

from __future__ import annotations

import os
from pathlib import Path

import diffusers
from diffusers import SchedulerMixin

from .scheduler import USFScheduler
from .usf import PRESETS, SolverSchedule, StepDecision, available_presets, preset_schedule
from .usf_import import from_usf_decisions, load_usf_decisions

# name -> (diffusers class name, config overrides)
SOLVER_REGISTRY: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "solver_order": 2}),
    "dpmsolver++-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
}


def available_solvers() -> list[str]:
    return sorted(SOLVER_REGISTRY)


def resolve_solver(solver, base_scheduler: SchedulerMixin) -> SchedulerMixin:
    """The scheduler for one call: ``None`` is the pipeline's own scheduler (as in diffusers), a name
    builds that diffusers solver from the pipeline's scheduler config, a scheduler object is used as given."""
    if solver is None:
        return base_scheduler
    if isinstance(solver, SchedulerMixin):
        return solver
    if isinstance(solver, str) and solver.lower() in SOLVER_REGISTRY:
        class_name, overrides = SOLVER_REGISTRY[solver.lower()]
        return getattr(diffusers, class_name).from_config(base_scheduler.config, **overrides)
    if isinstance(solver, str) and solver in PRESETS:
        return USFScheduler.from_config(base_scheduler.config, preset=solver, schedule=None)
    if isinstance(solver, SolverSchedule):
        return USFScheduler.from_config(base_scheduler.config, schedule=solver.to_dict())
    if isinstance(solver, (str, os.PathLike)) and (str(solver).endswith(".json") or Path(solver).is_file()):
        return USFScheduler.from_config(base_scheduler.config, schedule=SolverSchedule.load(solver).to_dict())
    raise ValueError(
        f"solver must be None (the pipeline's scheduler), a diffusers scheduler object, a SolverSchedule, a path "
        f"to a schedule JSON, or one of {available_solvers()} (diffusers solvers) or {available_presets()} "
        f"(USF presets); got {solver!r}."
    )


__all__ = ["SOLVER_REGISTRY", "available_solvers", "resolve_solver", "USFScheduler", "SolverSchedule",
           "StepDecision", "available_presets", "preset_schedule", "load_usf_decisions", "from_usf_decisions"]
