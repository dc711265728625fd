"""CFG vs APG vs Adaptive Guidance vs LinearAG on the built-in digits model.

Each cell samples the same seeds (sample i: seed i, digit i % 10), 20 steps with the pipeline's own
scheduler, and scores them on the built-in digits features against ``eval/digits_train_stats.npz``:
FID (Heusel et al. 2017), class accuracy of the digits classifier, the grey-scale saturation analogues
(mean |x| in [-1, 1] and the share of clipped pixels, i.e. within 0.5/255 of 0 or 1) and the network
evaluations per sample (exact per-sample counts, averaged). Methods:

- ``cfg``: diffusers' CFG (uncond + w (cond - uncond)).
- ``apg``: APG (Sadat et al. 2024, arXiv:2410.02416) on x0 with η = 0, β = −0.5 and a norm threshold r
  calibrated for 16x16x1 images (``--apg-threshold``; the paper's SDXL r = 15 is for 128x128x4 latents).
- ``ag``: Adaptive Guidance (Castillo et al. 2023, arXiv:2312.12487), per-sample truncation, γ on x0
  (``--ag-space``; on this model cos(ε_c, ε_u) starts at 0.9999 and falls, so the paper's ε rule with
  γ̄ = 0.991 would stop guidance at step 0), threshold ``--ag-threshold`` (0.95: about half-way at w = 1.5).
- ``linear-ag``: LinearAG fitted per scale on ``--calib-n`` calibration trajectories (seeds from 1,000,000,
  disjoint from the evaluation seeds), replacing steps 1-9, then AG.

    python benchmarks/guidance.py                        # full run: writes results/guidance.json + .png
    python benchmarks/guidance.py --n 200 --out out/g   # a quick look
    python benchmarks/guidance.py --probe                # γ_t and ‖Δ‖ statistics used to set thresholds

Partial results are written after every cell; a rerun skips cells already in the JSON (``--fresh`` to redo).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastgen import load_builtin  # noqa: E402
from fastgen.cli_eval import ImageStats  # noqa: E402
from fastgen.guidance import APG, CFG, AdaptiveGuidance, LinearAG  # noqa: E402
from fastgen.guidance.calibrate import fit_linear_ag  # noqa: E402
from fastgen.metrics import FeatureStats, frechet_distance, get_extractor, load_stats  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("cfg", "apg", "ag", "linear-ag")


def load_digits():
    """The built-in digits pipeline (built from its components if the folder has no model_index.json yet)."""
    from fastgen.builtin import builtin_path
    path = builtin_path("digits")
    if (path / "model_index.json").is_file():
        return load_builtin("digits")
    from diffusers import DPMSolverMultistepScheduler, UNet2DModel
    from fastgen import FastGenClassPipeline
    return FastGenClassPipeline(scheduler=DPMSolverMultistepScheduler.from_pretrained(path / "scheduler"),
                                unet=UNet2DModel.from_pretrained(path / "unet").eval(),
                                id2label={i: str(i) for i in range(10)})


def make_guider(method: str, scale: float, args, fits: dict):
    if method == "cfg":
        return CFG(guidance_scale=scale)
    if method == "apg":
        return APG(guidance_scale=scale, eta=0.0, norm_threshold=args.apg_threshold, momentum=-0.5)
    if method == "ag":
        return AdaptiveGuidance(guidance_scale=scale, threshold=args.ag_threshold, space=args.ag_space)
    return LinearAG(coefficients=fits[scale], threshold=args.ag_threshold, space=args.ag_space)


def run_cell(pipe, extractor, reference, guider, args) -> dict:
    stats = FeatureStats(extractor.num_features)
    pixels = ImageStats()
    nfe_total, truncation, seconds = 0, [], 0.0
    for start in range(0, args.n, args.batch_size):
        stop = min(args.n, start + args.batch_size)
        labels = [i % 10 for i in range(start, stop)]
        t0 = time.perf_counter()
        with torch.no_grad():
            out = pipe(class_labels=labels, num_inference_steps=args.steps, guidance=guider,
                       guidance_scale=guider.guidance_scale, seed=list(range(start, stop)), output_type="pt")
        seconds += time.perf_counter() - t0
        images = out.images.float().cpu()
        stats.update(extractor(images))
        pixels.update(images, extractor.classify(images), torch.tensor(labels))
        nfe_total += out.nfe * (stop - start)
        if isinstance(guider, AdaptiveGuidance):
            truncation += [args.steps if s is None else s for s in guider.truncation_step]
    metrics = pixels.metrics()
    cell = {"fid": frechet_distance(reference.mu, reference.sigma, stats.mu, stats.sigma),
            "class_accuracy": metrics.get("class_accuracy"), "mean_abs": metrics.get("mean_abs"),
            "clipped_share": metrics.get("clipped_fraction"), "nfe": nfe_total / args.n,
            "seconds": round(seconds, 1), "n": args.n}
    if truncation:
        cell["mean_truncation_step"] = sum(truncation) / len(truncation)
    return cell


def probe(pipe, args) -> None:
    """γ_t (ε space) and ‖D_c − D_u‖ (x0) per step under CFG: what the AG and APG thresholds are set from."""
    from fastgen.guidance.calibrate import _RecordingCFG
    for scale in args.scales:
        rec = _RecordingCFG(guidance_scale=scale)
        pipe(class_labels=[i % 10 for i in range(100)], num_inference_steps=args.steps, guidance=rec,
             guidance_scale=scale, seed=list(range(100)), output_type="latent")
        line = []
        for step in range(args.steps):
            c, u = rec.records[step]
            gamma = AdaptiveGuidance.cosine(c, u)
            line.append(f"{step}:{gamma.mean():.4f}/{gamma.min():.4f}")
        print(f"scale {scale}: gamma mean/min per step  " + " ".join(line), flush=True)
    apg = _DiffNorms(guidance_scale=3.0)
    pipe(class_labels=[i % 10 for i in range(100)], num_inference_steps=args.steps, guidance=apg,
         guidance_scale=3.0, seed=list(range(100)), output_type="latent")
    print("x0 ||D_c - D_u|| median per step: " + " ".join(f"{n:.3f}" for n in apg.norms), flush=True)


class _DiffNorms(CFG):
    norms: list = []

    def forward(self, pred_cond, pred_uncond=None):
        if pred_uncond is not None:
            self.norms.append(float((pred_cond - pred_uncond).flatten(1).norm(dim=1).median()))
        return super().forward(pred_cond, pred_uncond)


def plot(record: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    cells = record["cells"]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for method in METHODS:
        rows = sorted((c for c in cells if c["method"] == method), key=lambda c: c["scale"])
        if not rows:
            continue
        xs = [c["scale"] for c in rows]
        for ax, key in zip(axes, ("fid", "clipped_share", "class_accuracy", "nfe")):
            ax.plot(xs, [c[key] for c in rows], marker="o", label=method)
    for ax, title in zip(axes, ("FID (digits features, lower is better)", "share of clipped pixels",
                                "class accuracy", "NFE per sample")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("guidance scale w")
        ax.set_xscale("log")
        ax.set_xticks(record["config"]["scales"], [f"{s:g}" for s in record["config"]["scales"]])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    axes[0].legend(fontsize=8)
    fig.suptitle(f"built-in digits, {record['config']['steps']} steps, n={record['config']['n']} per cell", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def targets(record: dict) -> dict:
    """The issue's acceptance targets, evaluated on the measured cells."""
    by = {(c["method"], c["scale"]): c for c in record["cells"]}
    out = {}
    for scale in record["config"]["scales"]:
        cfg = by.get(("cfg", scale))
        if cfg is None:
            continue
        row = {}
        if scale >= 8 and ("apg", scale) in by:
            apg = by[("apg", scale)]
            row["apg_fid_below_cfg"] = apg["fid"] < cfg["fid"]
            row["apg_clipped_at_most_half"] = apg["clipped_share"] <= 0.5 * cfg["clipped_share"]
        for method, saving, tol in (("ag", 0.25, 0.03), ("linear-ag", 0.35, 0.05)):
            if (method, scale) in by:
                cell = by[(method, scale)]
                row[f"{method}_nfe_saving"] = 1 - cell["nfe"] / cfg["nfe"]
                row[f"{method}_fid_rel_change"] = cell["fid"] / cfg["fid"] - 1
                row[f"{method}_meets_target"] = (1 - cell["nfe"] / cfg["nfe"] >= saving
                                                 and cell["fid"] <= (1 + tol) * cfg["fid"])
        out[f"{scale:g}"] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.5, 3.0, 5.0, 8.0, 12.0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--apg-threshold", type=float, default=1.0)
    parser.add_argument("--ag-threshold", type=float, default=0.95)
    parser.add_argument("--ag-space", default="x0", choices=["eps", "x0"])
    parser.add_argument("--calib-n", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--probe", action="store_true")
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_digits()
    pipe.set_progress_bar_config(disable=True)
    if args.probe:
        probe(pipe, args)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "guidance.json", out / "guidance.png"
    config = {"n": args.n, "steps": args.steps, "scales": args.scales, "apg": {"eta": 0.0, "momentum": -0.5,
              "norm_threshold": args.apg_threshold, "space": "x0"},
              "ag": {"threshold": args.ag_threshold, "space": args.ag_space, "batch_rule": "sample"},
              "linear_ag": {"calibration_samples": args.calib_n, "calibration_seeds_from": 1_000_000,
                            "replaced_steps": f"1..{args.steps // 2 - 1}"},
              "scheduler": type(pipe.scheduler).__name__, "seeds": f"0..{args.n - 1}, digit = seed % 10",
              "reference": "eval/digits_train_stats.npz", "torch_threads": args.threads,
              "machine": platform.platform(), "torch": torch.__version__}
    record = {"config": config, "cells": [], "linear_ag_fits": {}}
    if json_path.exists() and not args.fresh:
        old = json.loads(json_path.read_text())
        if old.get("config", {}).get("n") == args.n and old.get("config", {}).get("steps") == args.steps:
            record["cells"], record["linear_ag_fits"] = old.get("cells", []), old.get("linear_ag_fits", {})
    extractor = get_extractor("digits")
    reference = load_stats(ROOT / "eval" / "digits_train_stats.npz")
    fits: dict = {}
    for scale in args.scales:
        for method in args.methods:
            if any(c["method"] == method and c["scale"] == scale for c in record["cells"]):
                continue
            if method == "linear-ag" and scale not in fits:
                key = f"{scale:g}"
                if key in record["linear_ag_fits"] and "fit" in record["linear_ag_fits"][key]:
                    fits[scale] = record["linear_ag_fits"][key]["fit"]
                else:
                    t0 = time.perf_counter()
                    fits[scale] = fit_linear_ag(pipe, num_inference_steps=args.steps, guidance_scale=scale,
                                                num_samples=args.calib_n, batch_size=args.batch_size)
                    record["linear_ag_fits"][key] = {"fit": fits[scale], "seconds": round(time.perf_counter() - t0, 1)}
            guider = make_guider(method, scale, args, fits)
            cell = {"method": method, "scale": scale, **run_cell(pipe, None or extractor, reference, guider, args)}
            record["cells"].append(cell)
            record["targets"] = targets(record)
            json_path.write_text(json.dumps(record, indent=1))
            print(json.dumps(cell), flush=True)
            try:
                plot(record, png_path)
            except Exception as err:  # plotting must not lose the numbers
                print(f"plot failed: {err}", flush=True)
    record["targets"] = targets(record)
    json_path.write_text(json.dumps(record, indent=1))
    plot(record, png_path)


if __name__ == "__main__":
    main()
