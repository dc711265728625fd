"""What the FastGen loop costs over stock diffusers: same model, seeds, scheduler and CFG, same process.

The FastGen class pipeline (``guidance="cfg"``, the model's own DPM-Solver++ scheduler, latents out) against the
diffusers recipe written out by hand (batched cond/uncond, CFG on epsilon, ``scheduler.step``). Repeats are
interleaved (A, B, A, B, ...) and the median time per call is reported with the ratio, at each batch size:
wall-clock seconds and the thread's CPU seconds (``time.thread_time`` with one torch thread: what the call
itself computed, insensitive to other processes waiting for the same cores on a shared machine).
Writes benchmarks/results/loop_overhead.json and .png.

    python benchmarks/loop_overhead.py --batch_sizes 4 100 --repeats 15
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import DPMSolverMultistepScheduler

from fastgen.benchmarking import builtin_pipeline, diffusers_class_loop, parse_options, portable, pyplot, write_json

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class LoopOverheadConfig:
    """What the FastGen loop costs over stock diffusers (same model, seeds, scheduler, CFG; same process)."""

    batch_sizes: list[int] = field(default_factory=lambda: [4, 100], metadata={"help": "images per call"})
    steps: int = field(default=20, metadata={"help": "solver steps (CFG: 2 evaluations each)"})
    guidance_scale: float = field(default=3.0, metadata={"help": "CFG scale"})
    repeats: int = field(default=15, metadata={"help": "timed calls per side and batch size (interleaved)"})
    threads: int = field(default=1, metadata={"help": "torch threads"})
    out: str = field(default=str(RESULTS / "loop_overhead.json"), metadata={"help": "output JSON (PNG beside it)"})


def main(argv=None) -> int:
    cfg = parse_options(LoopOverheadConfig, argv)
    pipe = builtin_pipeline("digits", threads=cfg.threads)
    rows = []
    for batch in cfg.batch_sizes:
        labels, seeds = [i % 10 for i in range(batch)], list(range(batch))

        def fastgen_call():
            return pipe(class_labels=labels, num_inference_steps=cfg.steps, guidance="cfg", seed=seeds,
                        guidance_scale=cfg.guidance_scale, output_type="latent").images.clamp(-1, 1)

        def stock_call():
            scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
            return diffusers_class_loop(pipe.unet, scheduler, labels, seeds, cfg.steps, cfg.guidance_scale,
                                        pipe.null_class_label)

        with torch.no_grad():
            diff = float((fastgen_call() - stock_call()).abs().max())
            wall = {"fastgen": [], "diffusers": []}
            cpu = {"fastgen": [], "diffusers": []}
            for _ in range(cfg.repeats):
                for name, fn in (("fastgen", fastgen_call), ("diffusers", stock_call)):
                    start, start_cpu = time.perf_counter(), time.thread_time()
                    fn()
                    wall[name].append(time.perf_counter() - start)
                    cpu[name].append(time.thread_time() - start_cpu)
        med = {k: statistics.median(v) for k, v in wall.items()}
        med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
        row = {"batch_size": batch, "seconds_fastgen": med["fastgen"], "seconds_diffusers": med["diffusers"],
               "ratio": med["fastgen"] / med["diffusers"],
               "cpu_seconds_fastgen": med_cpu["fastgen"], "cpu_seconds_diffusers": med_cpu["diffusers"],
               "cpu_ratio": med_cpu["fastgen"] / med_cpu["diffusers"], "max_abs_diff": diff,
               "ratio_of_minima": min(wall["fastgen"]) / min(wall["diffusers"])}
        print(row, flush=True)
        rows.append(row)
    record = {"config": {**asdict(cfg), "out": portable(cfg.out)}, "hardware": f"{platform.machine()} CPU, {os.cpu_count()} cores, "
              f"{cfg.threads} torch thread(s)", "torch": torch.__version__, "rows": rows}
    out = write_json(cfg.out, record)
    _plot(record, out.with_suffix(".png"))
    return 0


def _plot(record: dict, path: Path) -> None:
    plt = pyplot()
    rows = record["rows"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["seconds_diffusers"] for r in rows], 0.4, label="diffusers loop")
    ax.bar([x + 0.2 for x in xs], [r["seconds_fastgen"] for r in rows], 0.4, label="FastGen pipeline")
    for x, r in zip(xs, rows):
        ax.text(x, max(r["seconds_fastgen"], r["seconds_diffusers"]) * 1.02,
                f"wall x{r['ratio']:.3f}, cpu x{r['cpu_ratio']:.3f}", ha="center", fontsize=7)
    ax.set_xticks(list(xs), [f"batch {r['batch_size']}" for r in rows])
    ax.set_ylabel("seconds per call (median)")
    ax.set_title(f"Loop overhead, {record['config']['steps']} CFG steps ({record['hardware']})", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
