"""Digits FID of the built-in model versus steps, with CFG and without guidance, plus the real-data noise floor.

Every cell samples the same 2,000 seeds (sample i: seed i, digit i % 10) with the pipeline's scheduler
and scores them with :func:`fastgen.metrics.evaluate_pipeline` on the built-in digits features against the
``train`` split (the shipped reference statistics, ``builtin:digits``): FID (Heusel et al. 2017), KID
(Bińkowski et al. 2018), improved precision/recall (Kynkäänniemi et al. 2019), class accuracy of the
digits classifier, the grey-scale saturation analogues, NFE and wall time. The noise floor is the FID
of the 297 held-out real digits against the same reference; FID is biased upwards at small n, so the
floor is also given for 297 generated samples (the first 297 seeds of each cell). The model was trained on
the reference images, so FID against them also rewards reproducing the training set; ``fid_vs_heldout``
(samples vs the 297 held-out digits) is the generalisation view, to compare with the same floor (FID is
symmetric, so the floor is also "train vs held-out").

    python benchmarks/digits_fid.py            # writes benchmarks/results/digits_fid.json and .png
    python benchmarks/digits_fid.py --n 200 --steps 5 10 --out out/quick.json   # a quick look
"""
from __future__ import annotations

import hashlib
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fastgen.benchmarking import Results, parse_options, pyplot
from fastgen.metrics import FeatureStats, evaluate_images, evaluate_pipeline, frechet_distance, load_reference


@dataclass
class DigitsFidBenchmark:
    """Digits FID of the built-in model versus steps, with CFG and without guidance, plus the real-data noise floor."""

    n: int = field(default=2000, metadata={"help": "samples per cell"})
    steps: list[int] = field(default_factory=lambda: [5, 10, 20, 50])
    scale: float = field(default=3.0, metadata={"help": "CFG scale (the model's default)"})
    batch_size: int = 250
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})
    model: str = "builtin:digits"
    out: str = field(default="benchmarks/results/digits_fid.json", metadata={"help": "results JSON (+ .png)"})
    save_features: str | None = field(default=None, metadata={"help": "folder for the raw fake features (.npy per cell)"})
    plot_only: bool = field(default=False, metadata={"help": "redraw the PNG from an existing JSON"})
    fresh: bool = False


NOISE_FLOOR = ("297 held-out real digits vs the 1,000-image train reference (FID is symmetric: this is also train vs "
               "held-out, the value to compare fid_vs_heldout with)")


def _first(stats: FeatureStats, count: int) -> FeatureStats:
    """Statistics of the first ``count`` samples (by seed) of a kept-feature accumulator."""
    sub = FeatureStats(stats.num_features)
    sub.update(stats.features[:count].double())
    return sub


def _scores(res) -> dict:
    return {"fid": res.fid, "kid": res.kid, "kid_std": res.kid_std, "precision": res.precision, "recall": res.recall,
            "class_accuracy": res.accuracy, "mean_abs": res.mean_abs, "clipped_fraction": res.clipped_fraction,
            "roughness": res.roughness}


def measure(pipe, opts: DigitsFidBenchmark, steps: int, guidance: str, reference, heldout) -> dict:
    scale = opts.scale if guidance == "cfg" else 1.0
    res = evaluate_pipeline(pipe, opts.n, seed=0, batch_size=opts.batch_size, reference=reference, progress=False,
                            num_inference_steps=steps, guidance=None if guidance == "none" else guidance,
                            guidance_scale=scale)
    first = _first(res.features, 297)
    cell = {"guidance_scale": scale, "nfe": res.nfe, "n": res.num_samples, **_scores(res),
            "fid_n297": frechet_distance(reference.mu, reference.sigma, first.mu, first.sigma),
            "fid_vs_heldout": frechet_distance(heldout.mu, heldout.sigma, res.features.mu, res.features.sigma),
            "sampling_seconds": round(res.seconds, 2), "seconds": round(res.wall_seconds, 2)}
    if opts.save_features:
        Path(opts.save_features).mkdir(parents=True, exist_ok=True)
        np.save(Path(opts.save_features) / f"{guidance}_{steps}.npy", res.features.features.numpy())
    return cell


def plot(record: dict, path: Path) -> None:
    plt = pyplot()
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
    fig.suptitle(f"built-in digits model, {record['config']['n']} samples per cell, same seeds; {record['config']['hardware']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    opts = parse_options(DigitsFidBenchmark, argv)
    if opts.plot_only:
        results = Results(opts.out, {})
        plot(results.data, Path(opts.out).with_suffix(".png"))
        return 0
    torch.set_num_threads(opts.threads)
    from fastgen.builtin import load_pipeline
    from fastgen.metrics import get_extractor

    pipe = load_pipeline(opts.model)
    pipe.set_progress_bar_config(disable=True)
    extractor = get_extractor("digits")
    reference = load_reference("builtin:digits", extractor)
    heldout = load_reference("builtin:digits:heldout", extractor, progress=False)
    weights = sorted(Path(pipe.unet.config._name_or_path or ".").glob("*.safetensors"))
    config = {"benchmark": "digits_fid", "model": opts.model, "n": opts.n, "seeds": f"0..{opts.n - 1}",
              "unet_sha256_16": hashlib.sha256(weights[0].read_bytes()).hexdigest()[:16] if weights else None,
              "classes": "sample i -> digit i % 10", "solver": type(pipe.scheduler).__name__,
              "reference": "builtin:digits (train split, 1,000 images)", "features": "digits (64-d)",
              "hardware": f"CPU ({platform.machine()}, {os.cpu_count()} cores shared with other jobs), torch "
                          f"{torch.__version__}, {opts.threads} thread(s)"}
    results = Results(opts.out, config, resume_on=("n", "model"), fresh=opts.fresh)
    floor = evaluate_images("builtin:digits:heldout", reference=reference, progress=False)
    results.data["noise_floor"] = {**_scores(floor), "n": floor.num_samples, "what": NOISE_FLOOR}
    print(f"noise floor: FID {floor.fid:.3f}", flush=True)
    # cheap cells first, so a partial run still has results
    cells = sorted(((s, g) for s in opts.steps for g in ("none", "cfg")), key=lambda c: c[0] * (2 if c[1] == "cfg" else 1))
    results.run(cells, key=lambda c: {"steps": c[0], "guidance": c[1]},
                measure=lambda c: measure(pipe, opts, *c, reference, heldout), plot=plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
