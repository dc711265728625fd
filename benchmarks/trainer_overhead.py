"""Trainer overhead: seconds per generator step of ``fastgen distill``'s trainer vs a minimal hand-written loop.

Both run the same f-distill JS method of the digits recipe on the built-in teacher in this one process:
per generator step, ``critic_steps_per_generator_step`` critic updates (fake score + discriminator) and one
generator update, each a forward/backward, gradient-norm clipping and AdamW steps. The loop draws its
batches (noise, labels, real digits) the simplest way; the trainer adds its seeded per-update generators,
phase switching, statistics, logging and lr schedulers. No EMA, checkpoint or evaluation on either side.
Repeats are interleaved (trainer, loop, trainer, loop, ...) and the medians compared.

    python benchmarks/trainer_overhead.py            # writes benchmarks/results/trainer_overhead.json
"""
from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastgen.benchmarking import parse_options, portable, write_json

RESULTS = Path(__file__).resolve().parent / "results"
RECIPE = Path(__file__).resolve().parents[1] / "distill" / "digits-fdistill-js.yaml"


@dataclass
class OverheadBenchmark:
    """Trainer vs hand-written loop, same method and work, interleaved repeats."""

    steps: int = field(default=10, metadata={"help": "timed generator steps per repeat (after as many warm-up steps)"})
    repeats: int = field(default=3, metadata={"help": "interleaved repeats"})
    batch: int = field(default=32, metadata={"help": "global batch"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})
    out: str = field(default=str(RESULTS / "trainer_overhead.json"), metadata={"help": "results JSON"})


def _config(opts: OverheadBenchmark, output_dir: str):
    import yaml

    from fastgen.training.config import DistillConfig

    recipe = yaml.safe_load(RECIPE.read_text())
    recipe.update(output_dir=output_dir, train_batch_size=opts.batch, max_train_steps=2 * opts.steps,
                  logging_steps=opts.steps, checkpointing_steps=10**6, validation_steps=0, use_ema=False,
                  report_to="none", progress=False, resume_from_checkpoint=None)
    return DistillConfig(**recipe)


def trainer_seconds(opts: OverheadBenchmark) -> float:
    from fastgen.training.trainer import DistillTrainer

    with tempfile.TemporaryDirectory() as tmp:
        DistillTrainer(_config(opts, tmp)).train()
        log = [json.loads(line) for line in Path(tmp, "train_log.jsonl").read_text().splitlines()]
    return [r for r in log if "seconds_per_step" in r][-1]["seconds_per_step"]  # the second (warm) window


def loop_seconds(opts: OverheadBenchmark, state: dict) -> float:
    import torch

    from fastgen.training.method import Batch
    from fastgen.training.trainer import build_method

    if "method" not in state:  # built once, like the trainer's own setup (not timed there either)
        from fastgen.training.data import load_real_data
        from fastgen.training.teacher import load_teacher

        config = _config(opts, tempfile.mkdtemp())
        teacher = load_teacher(config)
        method = build_method(config, teacher).train()
        groups = method.optimizer_groups()
        state.update(config=config, method=method, groups=groups, shape=tuple(teacher.sample_shape),
                     real=load_real_data(config.dataset, teacher_name=config.teacher, sample_shape=teacher.sample_shape,
                                         latent=False, seed=config.seed),
                     opts={g: torch.optim.AdamW(ps, lr=config.group_learning_rate(g), weight_decay=0.01)
                           for g, ps in groups.items()})
    config, method, groups, optims = state["config"], state["method"], state["groups"], state["opts"]
    gen = torch.Generator().manual_seed(0)
    critic = [g for g in groups if g != "generator"]

    def update(phase: str, names: list[str], step: int) -> None:
        real, real_labels = state["real"].rows(step * opts.batch, opts.batch)
        batch = Batch(labels=torch.randint(0, 10, (opts.batch,), generator=gen),
                      noise=torch.randn(opts.batch, *state["shape"], generator=gen), real=real,
                      real_labels=real_labels, generator=gen)
        method(phase, batch)["loss"].backward()
        for g in names:
            torch.nn.utils.clip_grad_norm_(groups[g], config.max_grad_norm)
            optims[g].step()
        for o in optims.values():
            o.zero_grad(set_to_none=True)

    def step(i: int) -> None:
        for _ in range(config.critic_steps_per_generator_step):
            update("critic", critic, i)
        update("generator", ["generator"], i)

    for i in range(opts.steps):
        step(i)
    t0 = time.perf_counter()
    for i in range(opts.steps):
        step(i)
    return (time.perf_counter() - t0) / opts.steps


def main(argv=None) -> dict:
    opts = parse_options(OverheadBenchmark, argv)
    import torch

    torch.set_num_threads(opts.threads)
    trainer, loop, state = [], [], {}
    for rep in range(opts.repeats):
        trainer.append(trainer_seconds(opts))
        loop.append(loop_seconds(opts, state))
        print(f"repeat {rep}: trainer {trainer[-1]:.3f} s/step, loop {loop[-1]:.3f} s/step", flush=True)
    ratio = statistics.median(trainer) / statistics.median(loop)
    record = {"config": {**asdict(opts), "out": portable(opts.out), "recipe": RECIPE.name},
              "hardware": f"{platform.machine()} CPU, {opts.threads} torch thread(s), shared 2-core machine",
              "trainer_seconds_per_step": trainer, "loop_seconds_per_step": loop,
              "median_ratio": ratio, "target": 1.10}
    write_json(opts.out, record)
    print(f"trainer / hand-written loop (medians): {ratio:.3f}x (target <= 1.10)")
    return record


if __name__ == "__main__":
    main()
