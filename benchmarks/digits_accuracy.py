"""Class accuracy and speed of the built-in digits model: FastGen pipeline vs a plain diffusers loop.

Both sample the same seeds with the pipeline's scheduler (DPM-Solver++ 2M) and CFG on epsilon; the
built-in digits classifier scores whether each image shows the requested digit. Writes
benchmarks/results/digits_accuracy.json and .png.

    python benchmarks/digits_accuracy.py --n 1000
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import fastgen
from fastgen.grid import image_grid

RESULTS = Path(__file__).resolve().parent / "results"


def stock_loop(pipe, labels, steps, scale, seeds):
    """The diffusers recipe, written out: per-seed noise, batched cond/uncond, eps CFG, scheduler.step."""
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    unet = pipe.unet
    size = unet.config.sample_size
    x = torch.cat([torch.randn(1, unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(s))
                   for s in seeds])
    null = torch.full_like(labels, pipe.null_class_label)
    for t in sched.timesteps:
        if scale > 1:
            eps_u, eps_c = unet(torch.cat([x, x]), t, class_labels=torch.cat([null, labels])).sample.chunk(2)
            eps = eps_u + scale * (eps_c - eps_u)
        else:
            eps = unet(x, t, class_labels=labels).sample
        x = sched.step(eps, t, x).prev_sample
    return (x / 2 + 0.5).clamp(0, 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="images per cell (classes cycle 0..9)")
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "digits_accuracy.json"))
    args = parser.parse_args(argv)
    if args.n <= 0 or args.batch_size <= 0:
        raise SystemExit("--n and --batch-size must be positive")
    torch.set_num_threads(args.threads)

    pipe = fastgen.load_builtin("digits")
    pipe.set_progress_bar_config(disable=True)
    clf = fastgen.load_builtin("digits-features")
    labels_all = torch.arange(args.n) % 10
    rows, grids = [], []
    for scale in args.scales:
        for steps in args.steps:
            correct = {"fastgen": 0, "diffusers": 0}
            seconds = {"fastgen": 0.0, "diffusers": 0.0}
            max_diff, nfe = 0.0, None
            for start in range(0, args.n, args.batch_size):
                labels = labels_all[start:start + args.batch_size]
                seeds = list(range(start, start + len(labels)))
                with torch.no_grad():
                    t0 = time.perf_counter()
                    out = pipe(class_labels=labels.tolist(), num_inference_steps=steps, guidance_scale=scale,
                               seed=seeds, output_type="pt")
                    t1 = time.perf_counter()
                    ref = stock_loop(pipe, labels, steps, scale, seeds)
                    t2 = time.perf_counter()
                    seconds["fastgen"] += t1 - t0
                    seconds["diffusers"] += t2 - t1
                    nfe = out.nfe
                    max_diff = max(max_diff, float((out.images - ref).abs().max()))
                    for name, imgs in (("fastgen", out.images), ("diffusers", ref)):
                        correct[name] += int((clf.classify(imgs * 2 - 1) == labels).sum())
                if start == 0 and steps == max(args.steps):
                    grids.append((scale, out.images[:50]))
            row = {"guidance_scale": scale, "steps": steps, "nfe": nfe, "n": args.n,
                   "accuracy_fastgen": correct["fastgen"] / args.n, "accuracy_diffusers": correct["diffusers"] / args.n,
                   "seconds_fastgen": round(seconds["fastgen"], 3), "seconds_diffusers": round(seconds["diffusers"], 3),
                   "time_ratio_fastgen_over_diffusers": round(seconds["fastgen"] / seconds["diffusers"], 3),
                   "max_abs_diff": max_diff}
            rows.append(row)
            print(json.dumps(row), flush=True)

    record = {"benchmark": "digits class accuracy, FastGen pipeline vs plain diffusers loop (same seeds)",
              "hardware": f"CPU ({platform.processor() or platform.machine()}), {args.threads} thread(s)",
              "classifier": "fastgen built-in digits-features", "rows": rows}
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(record, indent=2) + "\n")
    _plot(rows, out_path.with_suffix(".png"), grids)
    print(f"wrote {out_path} and {out_path.with_suffix('.png')}")
    return 0


def _plot(rows, path, grids):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 1 + len(grids), figsize=(5 + 4 * len(grids), 4))
    ax = axes[0] if len(grids) else axes
    for scale in sorted({r["guidance_scale"] for r in rows}):
        sel = [r for r in rows if r["guidance_scale"] == scale]
        ax.plot([r["steps"] for r in sel], [100 * r["accuracy_fastgen"] for r in sel], "o-",
                label=f"fastgen, scale {scale:g}")
        ax.plot([r["steps"] for r in sel], [100 * r["accuracy_diffusers"] for r in sel], "x--",
                label=f"diffusers loop, scale {scale:g}")
    ax.axhline(95, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("steps")
    ax.set_ylabel("class accuracy (%)")
    ax.set_title("built-in digits model")
    ax.legend(fontsize=7)
    for a, (scale, imgs) in zip(axes[1:] if len(grids) else [], grids):
        grid = image_grid([im.permute(1, 2, 0).numpy() for im in imgs], ncols=10, cell_size=32)
        a.imshow(grid)
        a.set_title(f"samples, scale {scale:g}, {max(r['steps'] for r in rows)} steps")
        a.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
