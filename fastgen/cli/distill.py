"""``fastgen distill``: distil a diffusion teacher into a one- or few-step student (DMD2, f-distill).

Options are the fields of :class:`fastgen.training.config.DistillConfig` (diffusers' flag names:
``--output-dir``, ``--resume-from-checkpoint latest``, ``--checkpointing-steps``, ``--max-train-steps``,
...); ``--config distill/<recipe>.yaml`` reads a recipe whose values the command-line options override.
``--validate-only`` checks everything that can be checked without loading a model. Under accelerate the
same options go to ``accelerate launch -m fastgen.distill``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..training.config import DistillConfig
from .command import Command


@dataclass
class DistillCommandConfig(DistillConfig):
    validate_only: bool = field(default=False, metadata={
        "help": "check the configuration (teacher, dataset and checkpoint paths included) and exit before loading "
                "any model"})


def run(config: DistillCommandConfig) -> dict:
    import dataclasses

    from ..training.config import launch_state, validate_for_launch

    options = {f.name: getattr(config, f.name) for f in dataclasses.fields(DistillConfig)}
    run_config = validate_for_launch(DistillConfig(**options))
    if config.validate_only:
        return {"valid": True, "method": run_config.method, "teacher": run_config.teacher,
                "processes": launch_state().num_processes, "config": run_config.to_dict()}
    from ..training.trainer import run_distillation

    return run_distillation(run_config)


def summary(r: dict) -> str:
    if r.get("valid"):
        return f"configuration valid: {r['method']} from {r['teacher']} on {r['processes']} process(es)"
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in (r.get("metrics") or {}).items())
    return (f"{r['step']} generator steps ({r['steps_this_run']} this run); student saved in {r['student']}"
            + (f"; last evaluation: {metrics}" if metrics else ""))


COMMANDS = [Command(
    "distill", DistillCommandConfig, run, summary=summary, recipe=True,
    help="distil a teacher into a one- or few-step student (DMD2, f-distill)",
    description="Train a one- or few-step student of a diffusion teacher with DMD2 or f-distill on accelerate: "
                "checkpoints (atomic, resumable with --resume-from-checkpoint latest), EMA, in-training digits "
                "FID and sample grids, JSONL log. Recipes: distill/*.yaml (--config); multi-GPU: accelerate launch "
                "-m fastgen.distill with the same options.")]
