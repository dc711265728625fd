#!/usr/bin/env python
"""Class accuracy of the built-in digits diffusion model, sampled with plain diffusers.

Draws ``--num-samples`` images with class labels cycling 0..9 using only stock diffusers parts:
the UNet and the ``DPMSolverMultistepScheduler`` saved in the model folder, classifier-free
guidance in epsilon space (``eps = eps_u + w (eps_c - eps_u)``, conditional and unconditional
halves in one batch; ``w = 1`` runs the conditional model alone), and one generator per sample
seeded with ``seed + sample index``. The samples are classified with the built-in
``DigitsFeatureNet``; the accuracy table (steps x guidance scale) is printed as JSON. A 10x10 grid
(columns = classes) at the largest step count and the best guidance scale is written as a PNG.

Example::

    python scripts/eval_digits_accuracy.py --num-samples 1000 --grid digits_grid.png
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import DPMSolverMultistepScheduler, UNet2DModel  # noqa: E402

from fastgen.metrics.digits import DigitsFeatureNet  # noqa: E402

NULL_LABEL = 10


@torch.inference_mode()
def sample_digits(unet: UNet2DModel, scheduler: DPMSolverMultistepScheduler, labels: torch.Tensor, seeds: list[int],
                  num_steps: int, guidance_scale: float) -> torch.Tensor:
    """Sample one batch with a stock diffusers loop; returns images in [-1, 1]."""
    size = unet.config.sample_size
    noise = torch.cat([torch.randn(1, unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(s))
                       for s in seeds])
    scheduler.set_timesteps(num_steps)
    x = noise * scheduler.init_noise_sigma
    null = torch.full_like(labels, NULL_LABEL)
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        if guidance_scale == 1.0:
            eps = unet(inp, t, class_labels=labels).sample
        else:
            eps_c, eps_u = unet(torch.cat([inp, inp]), t, class_labels=torch.cat([labels, null])).sample.chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        x = scheduler.step(eps, t, x).prev_sample
    return x.clamp(-1, 1)


def save_grid(images: torch.Tensor, labels: torch.Tensor, path: Path, title: str, scale: int = 4) -> None:
    """10x10 PNG grid, one column per class, with the class printed above each column."""
    from PIL import Image, ImageDraw

    n, _, h, w = images.shape
    pad, top = 2, 14 + 12
    cols, rows = 10, (n + 9) // 10
    cw, ch = w * scale + pad, h * scale + pad
    canvas = Image.new("L", (cols * cw + pad, rows * ch + pad + top), 255)
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 1), title, fill=0)
    pix = ((images[:, 0] + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    for i in range(n):
        r, c = divmod(i, cols)
        tile = Image.fromarray(pix[i]).resize((w * scale, h * scale), Image.NEAREST)
        canvas.paste(tile, (pad + c * cw, top + pad + r * ch))
        if r == 0:
            draw.text((pad + c * cw + w * scale // 2 - 3, 13), str(int(labels[i])), fill=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("fastgen/assets/digits"), help="folder with unet/ and scheduler/")
    p.add_argument("--features", type=Path, default=Path("fastgen/assets/digits-features"), help="DigitsFeatureNet folder")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--guidance-scales", type=float, nargs="+", default=[1.0, 2.0, 3.0, 4.0])
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0, help="sample i uses torch.Generator().manual_seed(seed + i)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--grid", type=str, default="digits_grid.png", help="PNG grid path ('' to skip)")
    p.add_argument("--json-out", type=Path, default=None, help="also write the results JSON here")
    args = p.parse_args(argv)
    if args.num_samples < 1 or args.batch_size < 1 or min(args.steps) < 1:
        p.error("--num-samples, --batch-size and --steps must be positive")
    if min(args.guidance_scales) < 1.0:
        p.error("--guidance-scales must be >= 1 (1 = no guidance)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    unet = UNet2DModel.from_pretrained(args.model / "unet").eval()
    scheduler = DPMSolverMultistepScheduler.from_pretrained(args.model / "scheduler")
    net = DigitsFeatureNet.from_pretrained(args.features)
    labels = torch.arange(args.num_samples) % 10

    table: dict[str, dict[str, float]] = {}
    first_batch: dict[tuple[int, float], torch.Tensor] = {}
    t0 = time.perf_counter()
    for steps in args.steps:
        for w in args.guidance_scales:
            correct = 0
            for start in range(0, args.num_samples, args.batch_size):
                idx = range(start, min(start + args.batch_size, args.num_samples))
                x = sample_digits(unet, scheduler, labels[idx.start : idx.stop], [args.seed + i for i in idx], steps, w)
                correct += int((net.classify(x) == labels[idx.start : idx.stop]).sum())
                if start == 0:
                    first_batch[(steps, w)] = x[:100]
            table.setdefault(f"steps={steps}", {})[f"w={w:g}"] = round(correct / args.num_samples, 4)
            print(f"steps={steps:3d} w={w:g}: accuracy {correct / args.num_samples:.4f}", file=sys.stderr, flush=True)

    max_steps = max(args.steps)
    guided = [w for w in args.guidance_scales if w > 1.0] or args.guidance_scales
    best_w = max(guided, key=lambda w: (table[f"steps={max_steps}"][f"w={w:g}"], -w))
    result = {"num_samples": args.num_samples, "seed": args.seed, "sampler": "DPMSolverMultistepScheduler",
              "accuracy": table, "best_guidance_scale_at_max_steps": best_w, "wall_seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    if args.grid:
        grid = first_batch[(max_steps, best_w)]
        acc = table[f"steps={max_steps}"][f"w={best_w:g}"]
        save_grid(grid, labels[: grid.shape[0]], Path(args.grid), f"{max_steps} steps, CFG w={best_w:g}, acc {acc:.3f}")
    return result


if __name__ == "__main__":
    main()
