"""Class accuracy and speed of the built-in digits model: FastGen pipeline vs a plain diffusers loop.

Both sample the same seeds with the pipeline's scheduler (DPM-Solver++ 2M) and CFG on epsilon (the plain loop
is :func:`fastgen.benchmarking.diffusers_class_loop`); both image sets are scored by
:func:`fastgen.metrics.evaluate_images` (digits classifier accuracy, FID against the train-split statistics).
Writes benchmarks/results/digits_accuracy.json and .png.

    python benchmarks/digits_accuracy.py --n 1000
"""
from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastgen.benchmarking import Results, builtin_pipeline, diffusers_class_loop, parse_options, pyplot
from fastgen.grid import image_grid
from fastgen.metrics import evaluate_images


@dataclass
class AccuracyBenchmark:
    """Class accuracy and speed of the built-in digits model: FastGen pipeline vs a plain diffusers loop."""

    n: int = field(default=1000, metadata={"help": "images per cell (classes cycle 0..9)"})
    steps: list[int] = field(default_factory=lambda: [5, 10, 20])
    scales: list[float] = field(default_factory=lambda: [1.0, 3.0])
    batch_size: int = 250
    threads: int = 1
    out: str = "benchmarks/results/digits_accuracy.json"
    fresh: bool = False


def measure(pipe, opts: AccuracyBenchmark, scale: float, steps: int, grids: dict) -> dict:
    """Sample both ways (interleaved per batch, same seeds), then score both sets with the one evaluator."""
    from diffusers import DPMSolverMultistepScheduler

    labels = torch.arange(opts.n) % 10
    images = {"fastgen": [], "diffusers": []}
    seconds = {"fastgen": 0.0, "diffusers": 0.0}
    nfe = None
    for start in range(0, opts.n, opts.batch_size):
        batch = labels[start:start + opts.batch_size]
        seeds = list(range(start, start + len(batch)))
        t0 = time.perf_counter()
        with torch.no_grad():
            out = pipe(class_labels=batch.tolist(), num_inference_steps=steps, guidance_scale=scale, seed=seeds,
                       output_type="pt")
        t1 = time.perf_counter()
        ref = diffusers_class_loop(pipe.unet, DPMSolverMultistepScheduler.from_config(pipe.scheduler.config), batch,
                                   seeds, steps, scale, pipe.null_class_label)
        seconds["fastgen"] += t1 - t0
        seconds["diffusers"] += time.perf_counter() - t1
        nfe = out.nfe
        images["fastgen"].append(out.images.float())
        images["diffusers"].append((ref / 2 + 0.5).clamp(0, 1))
    images = {k: torch.cat(v) for k, v in images.items()}
    if steps == max(opts.steps):
        grids[scale] = images["fastgen"][:50]
    scores = {k: evaluate_images(v, labels, knn_metrics=False, progress=False) for k, v in images.items()}
    return {"nfe": nfe, "n": opts.n,
            "accuracy_fastgen": scores["fastgen"].accuracy, "accuracy_diffusers": scores["diffusers"].accuracy,
            "fid_fastgen": scores["fastgen"].fid, "fid_diffusers": scores["diffusers"].fid,
            "seconds_fastgen": round(seconds["fastgen"], 3), "seconds_diffusers": round(seconds["diffusers"], 3),
            "time_ratio_fastgen_over_diffusers": round(seconds["fastgen"] / seconds["diffusers"], 3),
            "max_abs_diff": float((images["fastgen"] - images["diffusers"]).abs().max())}


def plot(data: dict, path: Path, grids: dict) -> None:
    plt = pyplot()
    rows = data["cells"]
    fig, axes = plt.subplots(1, 1 + len(grids), figsize=(5 + 4 * len(grids), 4), squeeze=False)
    ax = axes[0][0]
    for scale in sorted({r["guidance_scale"] for r in rows}):
        sel = sorted((r for r in rows if r["guidance_scale"] == scale), key=lambda r: r["steps"])
        ax.plot([r["steps"] for r in sel], [100 * r["accuracy_fastgen"] for r in sel], "o-",
                label=f"fastgen, scale {scale:g}")
        ax.plot([r["steps"] for r in sel], [100 * r["accuracy_diffusers"] for r in sel], "x--",
                label=f"diffusers loop, scale {scale:g}")
    ax.axhline(95, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="steps", ylabel="class accuracy (%)", title="built-in digits model")
    ax.legend(fontsize=7)
    for a, (scale, imgs) in zip(axes[0][1:], sorted(grids.items())):
        a.imshow(image_grid([im.permute(1, 2, 0).numpy() for im in imgs], ncols=10, cell_size=32))
        a.set_title(f"samples, scale {scale:g}, {max(r['steps'] for r in rows)} steps")
        a.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    opts = parse_options(AccuracyBenchmark, argv)
    pipe = builtin_pipeline("digits", opts.threads)
    config = {"benchmark": "digits class accuracy, FastGen pipeline vs plain diffusers loop (same seeds)",
              "n": opts.n, "hardware": f"CPU ({platform.processor() or platform.machine()}), {opts.threads} thread(s)",
              "classifier": "fastgen built-in digits-features"}
    results = Results(opts.out, config, resume_on=("n",), fresh=opts.fresh)
    grids: dict = {}
    results.run([(scale, steps) for scale in opts.scales for steps in opts.steps],
                key=lambda c: {"guidance_scale": c[0], "steps": c[1]},
                measure=lambda c: measure(pipe, opts, *c, grids), plot=lambda d, p: plot(d, p, grids))


if __name__ == "__main__":
    main()
