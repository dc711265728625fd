"""CFG vs APG vs Adaptive Guidance vs LinearAG on the built-in digits model.

Each cell samples the same seeds (sample i: seed i, digit i % 10), 20 steps with the pipeline's own
scheduler, and scores them with :func:`fastgen.metrics.evaluate_pipeline` on the built-in digits features
against the shipped train-split statistics: FID (Heusel et al. 2017), class accuracy of the digits classifier, the grey-scale saturation analogues
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
    python benchmarks/guidance.py --n 200 --out out/g.json   # a quick look
    python benchmarks/guidance.py --probe                # γ_t and ‖Δ‖ statistics used to set thresholds

Partial results are written after every cell; a rerun skips cells already in the JSON (``--fresh`` to redo;
:mod:`fastgen.benchmarking`).
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastgen import load_builtin
from fastgen.benchmarking import Results, parse_options, pyplot
from fastgen.guidance import APG, CFG, AdaptiveGuidance, LinearAG
from fastgen.guidance.calibrate import fit_linear_ag
from fastgen.metrics import evaluate_pipeline

METHODS = ("cfg", "apg", "ag", "linear-ag")


@dataclass
class GuidanceBenchmark:
    """CFG vs APG vs Adaptive Guidance vs LinearAG on the built-in digits model."""

    n: int = field(default=2000, metadata={"help": "samples per cell (seeds 0..n-1, digit = seed % 10)"})
    steps: int = 20
    scales: list[float] = field(default_factory=lambda: [1.5, 3.0, 5.0, 8.0, 12.0])
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata={"help": f"among {list(METHODS)}"})
    apg_threshold: float = 1.0
    ag_threshold: float = 0.95
    ag_space: str = field(default="x0", metadata={"help": "eps or x0"})
    calib_n: int = field(default=256, metadata={"help": "LinearAG calibration trajectories"})
    batch_size: int = 250
    threads: int = 1
    out: str = "benchmarks/results/guidance.json"
    probe: bool = field(default=False, metadata={"help": "print the γ_t and ‖Δ‖ statistics the thresholds come from"})
    fresh: bool = field(default=False, metadata={"help": "ignore cells already in --out"})


def make_guider(method: str, scale: float, opts: GuidanceBenchmark, fits: dict):
    if method == "cfg":
        return CFG(guidance_scale=scale)
    if method == "apg":
        return APG(guidance_scale=scale, eta=0.0, norm_threshold=opts.apg_threshold, momentum=-0.5)
    if method == "ag":
        return AdaptiveGuidance(guidance_scale=scale, threshold=opts.ag_threshold, space=opts.ag_space)
    return LinearAG(coefficients=fits[scale], threshold=opts.ag_threshold, space=opts.ag_space)


def measure(pipe, guider, opts: GuidanceBenchmark) -> dict:
    """One cell: :func:`fastgen.metrics.evaluate_pipeline` with ``guider`` (and AG's truncation steps)."""
    truncation: list[int] = []

    def record_truncation(_output, _start, _stop):
        if isinstance(guider, AdaptiveGuidance):
            truncation.extend(opts.steps if s is None else s for s in guider.truncation_step)

    res = evaluate_pipeline(pipe, opts.n, seed=0, batch_size=opts.batch_size, progress=False,
                            num_inference_steps=opts.steps, guidance=guider, guidance_scale=guider.guidance_scale,
                            on_batch=record_truncation)
    cell = {"fid": res.fid, "class_accuracy": res.accuracy, "mean_abs": res.mean_abs,
            "clipped_share": res.clipped_fraction, "roughness": res.roughness, "precision": res.precision,
            "recall": res.recall, "nfe": res.nfe, "seconds": round(res.seconds, 1), "n": res.num_samples}
    if truncation:
        cell["mean_truncation_step"] = sum(truncation) / len(truncation)
    return cell


def linear_ag_fit(pipe, scale: float, results: Results, opts: GuidanceBenchmark, fits: dict) -> None:
    """Fit (or reuse from the results file) LinearAG's coefficients at ``scale``."""
    key = f"{scale:g}"
    stored = results.data.setdefault("linear_ag_fits", {}).get(key, {})
    if "fit" in stored:
        fits[scale] = stored["fit"]
        return
    t0 = time.perf_counter()
    fits[scale] = fit_linear_ag(pipe, num_inference_steps=opts.steps, guidance_scale=scale, num_samples=opts.calib_n,
                                batch_size=opts.batch_size)
    results.data["linear_ag_fits"][key] = {"fit": fits[scale], "seconds": round(time.perf_counter() - t0, 1)}


def probe(pipe, opts) -> None:
    """γ_t (ε space) and ‖D_c − D_u‖ (x0) per step under CFG: what the AG and APG thresholds are set from."""
    from fastgen.guidance.calibrate import _RecordingCFG
    for scale in opts.scales:
        rec = _RecordingCFG(guidance_scale=scale)
        pipe(class_labels=[i % 10 for i in range(100)], num_inference_steps=opts.steps, guidance=rec,
             guidance_scale=scale, seed=list(range(100)), output_type="latent")
        line = []
        for step in range(opts.steps):
            c, u = rec.records[step]
            gamma = AdaptiveGuidance.cosine(c, u)
            line.append(f"{step}:{gamma.mean():.4f}/{gamma.min():.4f}")
        print(f"scale {scale}: gamma mean/min per step  " + " ".join(line), flush=True)
    apg = _DiffNorms(guidance_scale=3.0)
    pipe(class_labels=[i % 10 for i in range(100)], num_inference_steps=opts.steps, guidance=apg,
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


def main(argv=None) -> None:
    opts = parse_options(GuidanceBenchmark, argv)
    if set(opts.methods) - set(METHODS):
        raise SystemExit(f"--methods must be among {list(METHODS)}, got {opts.methods}")
    torch.set_num_threads(opts.threads)
    pipe = load_builtin("digits")
    pipe.set_progress_bar_config(disable=True)
    if opts.probe:
        probe(pipe, opts)
        return
    config = {"n": opts.n, "steps": opts.steps, "scales": opts.scales,
              "apg": {"eta": 0.0, "momentum": -0.5, "norm_threshold": opts.apg_threshold, "space": "x0"},
              "ag": {"threshold": opts.ag_threshold, "space": opts.ag_space, "batch_rule": "sample"},
              "linear_ag": {"calibration_samples": opts.calib_n, "calibration_seeds_from": 1_000_000,
                            "replaced_steps": f"1..{opts.steps // 2 - 1}"},
              "scheduler": type(pipe.scheduler).__name__, "seeds": f"0..{opts.n - 1}, digit = seed % 10",
              "reference": "builtin:digits (train split statistics)", "torch_threads": opts.threads,
              "machine": platform.platform(), "torch": torch.__version__}
    results = Results(opts.out, config, resume_on=("n", "steps"), fresh=opts.fresh)
    fits: dict = {}

    def run(cell):
        scale, method = cell
        if method == "linear-ag":
            linear_ag_fit(pipe, scale, results, opts, fits)
        return measure(pipe, make_guider(method, scale, opts, fits), opts)

    results.run([(scale, method) for scale in opts.scales for method in opts.methods],
                key=lambda c: {"method": c[1], "scale": c[0]}, measure=run, plot=plot,
                after=lambda data: data.update(targets=targets(data)))
    results.data["targets"] = targets(results.data)
    results.save()
    results.plot(plot)


if __name__ == "__main__":
    main()
