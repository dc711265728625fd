#!/usr/bin/env python
"""Class accuracy of the built-in digits diffusion model, sampled with plain diffusers.

Draws ``--num_samples`` images with class labels cycling 0..9 using only stock diffusers parts
(:func:`fastgen.benchmarking.diffusers_class_loop`: the UNet and the ``DPMSolverMultistepScheduler`` saved in
the model folder, CFG in epsilon space, one generator per sample seeded with ``seed + sample index``) and
scores them with :func:`fastgen.metrics.evaluate_images` (the built-in digits classifier; FID against the
train-split statistics as a bonus). The accuracy table (steps x guidance scale) is printed as JSON. A grid
(columns = classes) at the largest step count and the best guidance scale is written as a PNG.

Example::

    python scripts/eval_digits_accuracy.py --num_samples 1000 --grid digits_grid.png
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field

import torch


@dataclass
class AccuracyOptions:
    """Class accuracy of the built-in digits diffusion model, sampled with plain diffusers."""

    model: str = field(default="fastgen/assets/digits", metadata={"help": "folder with unet/ and scheduler/"})
    num_samples: int = 1000
    steps: list[int] = field(default_factory=lambda: [5, 10, 20])
    guidance_scales: list[float] = field(default_factory=lambda: [1.0, 2.0, 3.0, 4.0])
    batch_size: int = 250
    seed: int = field(default=0, metadata={"help": "sample i uses torch.Generator().manual_seed(seed + i)"})
    threads: int = 1
    grid: str = field(default="digits_grid.png", metadata={"help": "PNG grid path ('' to skip)"})
    json_out: str | None = field(default=None, metadata={"help": "also write the results JSON here"})


def main(argv: list[str] | None = None) -> dict:
    from diffusers import DPMSolverMultistepScheduler, UNet2DModel

    from fastgen.benchmarking import diffusers_class_loop, parse_options, write_json
    from fastgen.grid import image_grid
    from fastgen.metrics import evaluate_images

    opts = parse_options(AccuracyOptions, argv)
    torch.set_num_threads(opts.threads)
    unet = UNet2DModel.from_pretrained(f"{opts.model}/unet").eval()
    scheduler = DPMSolverMultistepScheduler.from_pretrained(f"{opts.model}/scheduler")
    labels = torch.arange(opts.num_samples) % 10

    table: dict[str, dict[str, float]] = {}
    samples: dict[tuple[int, float], torch.Tensor] = {}
    t0 = time.perf_counter()
    for steps in opts.steps:
        for w in opts.guidance_scales:
            images = torch.cat([
                diffusers_class_loop(unet, scheduler, labels[a:a + opts.batch_size],
                                     [opts.seed + i for i in range(a, min(a + opts.batch_size, opts.num_samples))],
                                     steps, w, null_label=unet.config.num_class_embeds - 1)
                for a in range(0, opts.num_samples, opts.batch_size)]) / 2 + 0.5
            res = evaluate_images(images, labels, knn_metrics=False, progress=False)
            table.setdefault(f"steps={steps}", {})[f"w={w:g}"] = round(res.accuracy, 4)
            samples[(steps, w)] = images[:100]
            print(f"steps={steps:3d} w={w:g}: accuracy {res.accuracy:.4f}, FID {res.fid:.3f}", file=sys.stderr, flush=True)

    max_steps = max(opts.steps)
    guided = [w for w in opts.guidance_scales if w > 1.0] or opts.guidance_scales
    best_w = max(guided, key=lambda w: (table[f"steps={max_steps}"][f"w={w:g}"], -w))
    result = {"num_samples": opts.num_samples, "seed": opts.seed, "sampler": "DPMSolverMultistepScheduler",
              "accuracy": table, "best_guidance_scale_at_max_steps": best_w,
              "wall_seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(result, indent=2))
    if opts.json_out:
        write_json(opts.json_out, result)
    if opts.grid:
        grid = samples[(max_steps, best_w)]
        acc = table[f"steps={max_steps}"][f"w={best_w:g}"]
        image_grid([im.permute(1, 2, 0).numpy() for im in grid], ncols=10,
                   captions=[str(int(c)) for c in labels[:len(grid)]], cell_size=48,
                   title=f"{max_steps} steps, CFG w={best_w:g}, acc {acc:.3f}").save(opts.grid)
    return result


if __name__ == "__main__":
    main()
