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


@dataclass
class CollectTrajectoriesConfig:
    """Options of ``fastgen distill collect-trajectories`` (AGD, :func:`fastgen.training.agd.collect_trajectories`)."""

    teacher: str = field(default="builtin:digits", metadata={"help": "the frozen base: builtin:<name> or a pipeline folder"})
    output_dir: str = field(default="runs/agd-trajectories", metadata={
        "help": "trajectory store folder (an existing store with the same options is resumed)"})
    num_trajectories: int = field(default=256, metadata={"help": "number of CFG trajectories (balanced over classes/prompts)"})
    num_inference_steps: int = field(default=50, metadata={"help": "solver steps (stored rows) per trajectory"})
    omega_min: float = field(default=1.0, metadata={"help": "guidance scales are drawn per trajectory from U[omega_min, omega_max]"})
    omega_max: float = field(default=8.0, metadata={"help": "upper end of the guidance-scale range"})
    seed: int = field(default=0, metadata={"help": "seed of the noise and guidance-scale draws (trajectory i: seed, i)"})
    batch_size: int = field(default=64, metadata={"help": "trajectories sampled together"})
    prompts: str | None = field(default=None, metadata={"help": "text-to-image bases: a file with one prompt per line"})
    solver: str | None = field(default=None, metadata={"help": "solver name (default: the base pipeline's scheduler)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


def run_collect(config: CollectTrajectoriesConfig) -> dict:
    import dataclasses

    from ..training.agd import collect_trajectories

    options = dataclasses.asdict(config)
    omega_range = (options.pop("omega_min"), options.pop("omega_max"))
    return collect_trajectories(options.pop("teacher"), options.pop("output_dir"), omega_range=omega_range, **options)


@dataclass
class MergeMSDConfig:
    """Options of ``fastgen distill merge-msd`` (:func:`fastgen.training.msd.merge_students`)."""

    runs: list[str] = field(default_factory=list, metadata={
        "help": "the K run folders of fastgen distill --method msd --train-student k (k = 0..K-1, any order)"})
    output_dir: str = field(default="runs/msd-merged", metadata={
        "help": "the routed pipeline folder to write (must not exist)"})


def run_merge(config: MergeMSDConfig) -> dict:
    from ..training.msd import merge_students

    return {"student": str(merge_students(config.runs, config.output_dir)), "runs": list(config.runs)}


def summary(r: dict) -> str:
    if r.get("valid"):
        return f"configuration valid: {r['method']} from {r['teacher']} on {r['processes']} process(es)"
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in (r.get("metrics") or {}).items())
    return (f"{r['step']} generator steps ({r['steps_this_run']} this run); student saved in {r['student']}"
            + (f"; last evaluation: {metrics}" if metrics else ""))


COMMANDS = [Command(
    "distill", DistillCommandConfig, run, summary=summary, recipe=True,
    help="distil a teacher into a one- or few-step student (DMD2, f-distill) or a guidance adapter (AGD)",
    description="Train a one- or few-step student of a diffusion teacher with DMD2 or f-distill on accelerate: "
                "checkpoints (atomic, resumable with --resume-from-checkpoint latest), EMA, in-training digits "
                "FID and sample grids, JSONL log. Recipes: distill/*.yaml (--config); multi-GPU: accelerate launch "
                "-m fastgen.distill with the same options."),
    Command("distill collect-trajectories", CollectTrajectoriesConfig, run_collect,
            summary=lambda r: (f"{r['collected']} trajectories collected this run; store {r['output_dir']} "
                               f"{'complete' if r['complete'] else 'incomplete (run again to resume)'}"),
            help="AGD: store the base's CFG trajectories (x_t, t, condition, omega, CFG output) for --method agd",
            description="Run the frozen base with classifier-free guidance from noise, one guidance scale per "
                        "trajectory, and store every step in a memory-mapped fp16 store (resumable; sharded over "
                        "accelerate processes). Train on it with fastgen distill --method agd "
                        "--method-options '{\"trajectories\": DIR}'."),
    Command("distill merge-msd", MergeMSDConfig, run_merge,
            summary=lambda r: f"{len(r['runs'])} students joined into {r['student']}",
            help="MSD: join the students of K --train-student runs into one routed pipeline folder",
            description="Each run of fastgen distill --method msd --train-student k trains one student on its "
                        "part (on its own accelerate processes); this checks that the runs share one partition "
                        "and cover every part once, and writes the FastGenMSDPipeline (router + K students).")]
