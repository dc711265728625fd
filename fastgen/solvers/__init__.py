"""Solvers: which diffusers-protocol scheduler advances the sample each step.

The sampling loop accepts any ``diffusers.SchedulerMixin`` (``set_timesteps``, ``scale_model_input``,
``step``); ``resolve_solver`` maps the pipeline's ``solver=`` argument to one, built from the
pipeline's own scheduler config so the training noise schedule is kept.
"""
from __future__ import annotations

import diffusers
from diffusers import SchedulerMixin

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
    raise ValueError(
        f"solver must be None (the pipeline's scheduler), a diffusers scheduler object, or one of "
        f"{available_solvers()}; got {solver!r}."
    )


__all__ = ["SOLVER_REGISTRY", "available_solvers", "resolve_solver"]
