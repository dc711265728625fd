"""Digits FID of the built-in model versus steps, with CFG and without guidance, plus the real-data noise floor.

Every cell samples the same 2,000 seeds (sample i: seed i, digit i % 10) with the pipeline's scheduler
and scores them with ``fastgen.metrics`` on the built-in digits features against the ``train`` split
(the FID reference shipped as ``eval/digits_train_stats.npz``): FID (Heusel et al. 2017), KID
(Bińkowski et al. 2018), improved precision/recall (Kynkäänniemi et al. 2019), class accuracy of the
digits classifier, the grey-scale saturation analogues, NFE and wall time. The noise floor is the FID
of the 297 held-out real digits against the same reference; FID is biased upwards at small n, so the
floor is also given for 297 generated samples (the first 297 seeds of each cell). The model was trained on
the reference images, so FID against them also rewards reproducing the training set; ``fid_vs_heldout``
(samples vs the 297 held-out digits) is the generalisation view, to compare with the same floor (FID is
symmetric, so the floor is also "train vs held-out").

    python benchmarks/digits_fid.py            # writes benchmarks/results/digits_fid.json and .png
    python benchmarks/digits_fid.py --n 200 --steps 5 10 --out out/quick   # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastgen.cli_eval import builtin_digits, ImageStats, sample_pipeline  # noqa: E402
from fastgen.metrics import FeatureStats, frechet_distance, get_extractor, kernel_inception_distance  # noqa: E402
from fastgen.metrics import precision_recall  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def score(real: FeatureStats, fake: FeatureStats, kid_subset_size: int = 1000) -> dict:
    """FID, KID, precision and recall of ``fake`` against ``real`` (both with kept features)."""
    fid = frechet_distance(real.mu, real.sigma, fake.mu, fake.sigma)
    kid, kid_std = kernel_inception_distance(real.features, fake.features, subsets=100, subset_size=kid_subset_size)
    precision, recall = precision_recall(real.features, fake.features, k=3)
    return {"fid": fid, "kid": kid, "kid_std": kid_std, "precision": precision, "recall": recall}


def subset_stats(stats: FeatureStats, count: int) -> FeatureStats:
    """Statistics of the first ``count`` rows (by index) of a kept-feature accumulator."""
    sub = FeatureStats(stats.num_features, keep_features=True)
    sub.update(stats.features[:count].double())
    return sub


def heldout_features(extractor) -> tuple[FeatureStats, dict]:
    images, labels = builtin_digits("heldout")
    held = FeatureStats(extractor.num_features, keep_features=True)
    held.update(extractor(images))
    pixels = ImageStats()
    pixels.update(images, extractor.classify(images), labels)
    return held, pixels.metrics()


def noise_floor(reference: FeatureStats, held: FeatureStats, pixels: dict) -> dict:
    return {**score(reference, held), **pixels, "n": held.n,
            "what": "297 held-out real digits vs the 1,000-image train reference (FID is symmetric: this is "
                    "also train vs held-out, the value to compare fid_vs_heldout with)"}


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    floor = record["noise_floor"]
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    for guidance, style, color in (("cfg", "o-", "C0"), ("none", "s--", "C1")):
        cells = sorted((c for c in record["cells"] if c["guidance"] == guidance), key=lambda c: c["nfe"])
        if not cells:
            continue
        label = f"CFG w={cells[0]['guidance_scale']:g}" if guidance == "cfg" else "no guidance"
        nfe = [c["nfe"] for c in cells]
        axes[0].plot(nfe, [c["fid"] for c in cells], style, color=color, label=f"{label} (n={cells[0]['n']})")
        axes[0].plot(nfe, [c["fid_n297"] for c in cells], style, color=color, alpha=0.35,
                     label=f"{label}, first 297 samples")
        axes[0].plot(nfe, [c["fid_vs_heldout"] for c in cells], ":", marker=style[0], color=color, alpha=0.6,
                     label=f"{label}, vs held-out digits")
        axes[1].plot(nfe, [c["class_accuracy"] for c in cells], style, color=color, label=label)
        axes[2].plot(nfe, [c["precision"] for c in cells], style, color=color, label=f"{label} precision")
        axes[2].plot(nfe, [c["recall"] for c in cells], style, color=color, alpha=0.4, label=f"{label} recall")
        for c in cells:
            axes[0].annotate(f"{c['steps']}", (c["nfe"], c["fid"]), textcoords="offset points", xytext=(3, 4),
                             fontsize=7)
    axes[0].axhline(floor["fid"], color="gray", ls=":", label=f"real held-out vs train (n={floor['n']})")
    axes[1].axhline(floor["class_accuracy"], color="gray", ls=":", label="real held-out digits")
    axes[0].set(xscale="log", yscale="log", xlabel="NFE per sample (labels: steps)", ylabel="FID (digits features)",
                title="Digits FID vs NFE")
    axes[1].set(xscale="log", xlabel="NFE per sample", ylabel="class accuracy", title="Class accuracy", ylim=(0, 1.02))
    axes[2].set(xscale="log", xlabel="NFE per sample", ylabel="improved precision / recall (k=3)",
                title="Precision / recall", ylim=(0, 1.02))
    for ax in axes:
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(f"built-in digits model, {record['n']} samples per cell, same seeds; {record['hardware']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="samples per cell")
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50])
    parser.add_argument("--scale", type=float, default=3.0, help="CFG scale (the model's default)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--model", default="builtin:digits")
    parser.add_argument("--out", default=str(RESULTS / "digits_fid"), help="output path without extension")
    parser.add_argument("--save-features", default=None, help="folder for the raw fake features (.npy per cell)")
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from an existing JSON")
    args = parser.parse_args(argv)
    if args.plot_only:
        out = Path(args.out)
        plot(json.loads(out.with_suffix(".json").read_text()), out.with_suffix(".png"))
        return 0
    torch.set_num_threads(args.threads)
    from fastgen.cli_sample import load_pipeline

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    extractor = get_extractor("digits")
    reference = FeatureStats(extractor.num_features, keep_features=True)
    reference.update(extractor(builtin_digits("train")[0]))
    held, held_pixels = heldout_features(extractor)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    hardware = (f"CPU ({platform.machine()}, {os.cpu_count()} cores shared with other jobs), torch "
                f"{torch.__version__}, {args.threads} thread(s)")
    weights = sorted(Path(pipe.unet.config._name_or_path or ".").glob("*.safetensors"))
    import hashlib

    sha = hashlib.sha256(weights[0].read_bytes()).hexdigest()[:16] if weights else None
    record = {"benchmark": "digits_fid", "model": args.model, "unet_sha256_16": sha, "n": args.n, "seeds": f"0..{args.n - 1}",
              "classes": "sample i -> digit i % 10", "solver": type(pipe.scheduler).__name__,
              "reference": "builtin digits 'train' split (1,000 images) = eval/digits_train_stats.npz",
              "features": "digits (64-d)", "hardware": hardware, "noise_floor": noise_floor(reference, held, held_pixels),
              "cells": []}
    print(f"noise floor: FID {record['noise_floor']['fid']:.3f}", flush=True)
    # cheap cells first, so a partial run still has results
    cells = sorted(((s, g) for s in args.steps for g in ("none", "cfg")), key=lambda c: c[0] * (2 if c[1] == "cfg" else 1))
    for steps, guidance in cells:
        scale = args.scale if guidance == "cfg" else 1.0
        pixels = ImageStats()
        t0 = time.perf_counter()
        stats, nfe, sampling = sample_pipeline(
            pipe, extractor, args.n, steps=steps, guidance=None if guidance == "none" else guidance, scale=scale,
            solver=None, seed=0, batch_size=args.batch_size, image_stats=pixels, classify=True)
        cell = {"steps": steps, "guidance": guidance, "guidance_scale": scale, "nfe": nfe, "n": stats.n,
                **score(reference, stats), "fid_n297": None, "fid_vs_heldout": None, **pixels.metrics(),
                "sampling_seconds": round(sampling, 2), "seconds": round(time.perf_counter() - t0, 2)}
        cell["fid_n297"] = score(reference, subset_stats(stats, 297))["fid"]
        cell["fid_vs_heldout"] = frechet_distance(held.mu, held.sigma, stats.mu, stats.sigma)
        if args.save_features:
            Path(args.save_features).mkdir(parents=True, exist_ok=True)
            np.save(Path(args.save_features) / f"{guidance}_{steps}.npy", stats.features.numpy())
        record["cells"].append(cell)
        print(f"steps {steps:3d} {guidance:4s} NFE {nfe:3d}: FID {cell['fid']:.3f} (n=297: {cell['fid_n297']:.3f}, "
              f"vs held-out: {cell['fid_vs_heldout']:.3f}) "
              f"acc {cell['class_accuracy']:.3f} P {cell['precision']:.3f} R {cell['recall']:.3f} "
              f"{cell['seconds']:.0f}s", flush=True)
        out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
        plot(record, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
