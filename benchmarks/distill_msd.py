"""MSD on the digits teacher: K routed students vs one student (FID at equal total generator steps) and the
speed of half-width students, measured side by side.

Song et al., arXiv:2410.23274. Two parts:

1. **speed** (no training needed): seconds per image of a one-step full-width student (the teacher's
   architecture, a ``FastGenStudentPipeline``) and of a ``FastGenMSDPipeline`` of K students with
   ``--half-channels`` (random weights: speed depends on the architecture only), on the same labels
   (``i % 10``) and batch, alternating repetitions, median. Target (issue 12): >= 1.5x faster.
2. **quality** (from runs): the in-training evaluations (``train_log.jsonl``, EMA students on the run's fixed
   seeds) of ``fastgen distill`` runs, e.g. ``msd4=runs/msd4 half=runs/msd4-half`` and the single student
   (a run folder or ``record:benchmarks/results/distill.json:rkl``). MSD runs count generator steps of all
   students together, so equal ``step`` = equal total generator steps.

Writes benchmarks/results/distill_msd.json and .png.

    fastgen distill --config distill/digits-msd4.yaml --max_train_steps 300 --validation_steps 100 --output_dir runs/msd4
    python benchmarks/distill_msd.py --runs msd4=runs/msd4 single=record:benchmarks/results/distill.json:rkl
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill import evaluations  # noqa: E402  (run folders and earlier records, one reader)

from fastgen.benchmarking import builtin_pipeline, curve_colour, parse_options, portable, pyplot, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class MSDBenchmark:
    """MSD students vs one student: speed side by side, FID from runs."""

    runs: list[str] = field(default_factory=list, metadata={
        "help": "label=run_folder or label=record:<results json>:<label> (evaluations to plot); A+B joins two "
                "sources in step order (a kept run and its resumed continuation)"})
    students: int = field(default=4, metadata={"help": "K students of the speed cell"})
    half_channels: list[int] = field(default_factory=lambda: [16, 32, 48], metadata={
        "help": "block_out_channels of the small students (the digits teacher has 32, 64, 96)"})
    batch: int = field(default=250, metadata={"help": "images per timed call"})
    repeats: int = field(default=7, metadata={"help": "timed calls per pipeline (alternating, median)"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})
    out: str = field(default=str(RESULTS / "distill_msd.json"), metadata={"help": "results JSON (PNG beside it)"})


def speed_cells(opts: MSDBenchmark) -> dict:
    """Median seconds per image of one full-width student and of K small routed students (same labels, batch)."""
    import torch

    from fastgen.pipelines.msd import FastGenMSDPipeline
    from fastgen.pipelines.student import FastGenStudentPipeline
    from fastgen.training.msd import Partition, small_network

    teacher = builtin_pipeline("digits", threads=opts.threads)
    net = teacher.unet
    full = FastGenStudentPipeline.from_teacher(teacher, net, [700])
    smalls = [small_network(net, opts.half_channels, seed=k).eval() for k in range(opts.students)]
    msd = FastGenMSDPipeline.from_students(teacher, smalls, [700], Partition.fit_classes(teacher.num_classes,
                                                                                        opts.students))
    labels = [i % teacher.num_classes for i in range(opts.batch)]
    pipes = {"one full-width student": full, f"{opts.students} students {list(opts.half_channels)}": msd}
    times = {name: [] for name in pipes}
    with torch.inference_mode():
        for name, pipe in pipes.items():  # warm-up
            pipe(class_labels=labels, seed=0, output_type="pt")
        for _ in range(opts.repeats):
            for name, pipe in pipes.items():
                t0 = time.perf_counter()
                pipe(class_labels=labels, seed=0, output_type="pt")
                times[name].append((time.perf_counter() - t0) / opts.batch)
    params = {name: sum(p.numel() for n in (pipe.students if hasattr(pipe, "students") else [pipe.unet])
                        for p in n.parameters()) for name, pipe in pipes.items()}
    per_student = {name: params[name] // (opts.students if hasattr(pipe, "students") else 1)
                   for name, pipe in pipes.items()}
    cells = [{"pipeline": name, "seconds_per_image": statistics.median(ts), "all_seconds_per_image": ts,
              "parameters_total": params[name], "parameters_per_student": per_student[name], "nfe": pipes[name].nfe}
             for name, ts in times.items()]
    speedup = cells[0]["seconds_per_image"] / cells[1]["seconds_per_image"]
    return {"cells": cells, "speedup": round(speedup, 3), "target_met": speedup >= 1.5}


def main(argv=None) -> None:
    opts = parse_options(MSDBenchmark, argv)
    runs = {}
    for spec in opts.runs:
        label, sep, source = spec.partition("=")
        if not sep:
            raise ValueError(f"runs entries must be label=source, got {spec!r}.")
        name, rows = evaluations(source)
        runs[label] = {"source": name, "evaluations": rows}
    record = {"config": {**asdict(opts), "out": portable(opts.out),
                         "runs": [f"{k}={v['source']}" for k, v in runs.items()]},
              "hardware": f"{platform.machine()} CPU, {os.cpu_count()} cores, {opts.threads} torch thread(s), "
                          "shared with other jobs (alternating repetitions, median)",
              "speed": speed_cells(opts), "runs": runs}
    out = write_json(opts.out, record)
    plot(record, out.with_suffix(".png"))
    print(json.dumps(record["speed"], indent=1))


def plot(record: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, (label, run) in enumerate(record["runs"].items()):
        rows = run["evaluations"]
        axes[0].plot([r["step"] for r in rows], [r["fid"] for r in rows], marker="o", ms=4,
                     color=curve_colour(plt, i, len(record["runs"])), label=label)
    axes[0].set(xlabel="total generator steps (all students)", ylabel="digits FID", yscale="log",
                title="K routed students vs one student")
    if record["runs"]:
        axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.16))  # below: the curves stay visible
    else:
        axes[0].text(0.5, 0.5, "no training runs in this record\n(speed only)", ha="center", va="center",
                     transform=axes[0].transAxes, fontsize=9)
    cells = record["speed"]["cells"]
    axes[1].bar(range(len(cells)), [1000 * c["seconds_per_image"] for c in cells], color=["tab:blue", "tab:orange"])
    axes[1].set_xticks(range(len(cells)), [c["pipeline"] for c in cells], fontsize=7)
    axes[1].set(ylabel="ms per image (median, one step)", title=f"speed: {record['speed']['speedup']:.2f}x")
    fig.subplots_adjust(wspace=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
