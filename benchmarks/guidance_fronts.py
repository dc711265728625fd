"""Guidance fronts: FID against class accuracy per method over a sweep of scales, with the trivial baselines.

A method that guides less gets lower FID on a model whose unguided samples already match the data (the
built-in ``digits``): a point is only a win if it lies below the front of CFG *and* below the front of
CFG limited to an interval of steps (Kynkäänniemi et al. 2024, arXiv:2404.07724; the trivial way to save
evaluations) at the same class accuracy. This benchmark measures, per workload (``--model digits`` or
``digits-small``):

- every method at every scale (same seeds 0..n-1, digit = seed % 10, ``--steps`` steps of the model's own
  scheduler), scored by :func:`fastgen.metrics.evaluate_pipeline`: FID (digits features, train-split
  reference), class accuracy, precision/recall, NFE per image. Methods are resolved **by name** through the
  pipeline, so they run with the settings the model folder recommends (``guidance.json``; recorded per cell):
  ``none`` (w = 1), ``cfg``, ``cfg-interval`` (σ interval ``--interval``), ``apg``, ``ag``, ``linear-ag``
  (coefficients shipped in the model folder);
- the front comparison: for each point, CFG's and the interval baseline's FID at the same accuracy (linear
  interpolation along their scale sweeps, both starting at the unguided point) and whether it lies below both;
- for AG and LinearAG, the interval baseline at the same NFE and scale: CFG on the first k steps only
  (``cfg-first-k``, k = round(NFE − steps), i.e. AG's mean truncation made static), FID and accuracy side by side;
- wall time beside NFE: seconds per image of each method at ``--time-scale``, batch 4 and batch 100, in one
  process, ``--repeats`` interleaved repeats, median (a saving in NFE is only a saving in time if the batch
  shrinks: per-sample AG keeps full batches until every sample has truncated).

    python benchmarks/guidance_fronts.py --model digits-small --n 500
    python benchmarks/guidance_fronts.py --model digits --n 500 --out benchmarks/results/guidance_fronts_digits.json

Resumable (:mod:`fastgen.benchmarking`): cells already in the JSON are skipped.
"""
from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastgen.benchmarking import Results, builtin_pipeline, parse_options, pyplot
from fastgen.guidance import AdaptiveGuidance, CFGInterval, resolve_guidance
from fastgen.metrics import evaluate_pipeline

METHODS = ("none", "cfg", "cfg-interval", "apg", "ag", "linear-ag")
BASELINES = ("cfg", "cfg-interval")
ADAPTIVE = ("ag", "linear-ag")  # each gets an equal-NFE baseline: CFG on the first k steps, k = NFE - steps
EQUAL_NFE = "cfg-first-k"


@dataclass
class FrontsBenchmark:
    """Guidance fronts (FID vs class accuracy) per method, with CFG, interval-CFG and no guidance as baselines."""

    model: str = field(default="digits", metadata={"help": "built-in model: digits or digits-small"})
    n: int = field(default=500, metadata={"help": "samples per cell (seeds 0..n-1, digit = seed % 10)"})
    steps: int = 20
    scales: list[float] = field(default_factory=lambda: [1.5, 2.0, 3.0, 5.0, 8.0],
                                metadata={"help": "linear-ag needs coefficients fitted at each (shipped: 1.5 2 3 5 8)"})
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata={"help": f"among {list(METHODS)}"})
    interval: list[float] = field(default_factory=lambda: [0.28, 5.42], metadata={
        "help": "cfg-interval's (sigma_low, sigma_high]; default the paper's EDM2 interval"})
    time_scale: float = field(default=3.0, metadata={"help": "scale of the wall-time comparison"})
    time_batches: list[int] = field(default_factory=lambda: [4, 100])
    repeats: int = field(default=5, metadata={"help": "interleaved timing repeats (median); 0 skips timing"})
    batch_size: int = 250
    threads: int = 1
    out: str = ""
    fresh: bool = field(default=False, metadata={"help": "ignore cells already in --out"})


def guider(pipe, method: str, scale: float, opts: FrontsBenchmark, first_k: int | None = None):
    """The guider a cell runs: the pipeline's own resolution of the name (model settings applied)."""
    if method == "none":
        return None
    if method == EQUAL_NFE:
        return CFGInterval(guidance_scale=scale, sigma_low=None, sigma_high=None, stop=min(1.0, (first_k + 0.5) / opts.steps))
    g = resolve_guidance(method, scale, model_path=pipe.name_or_path)
    if method == "cfg-interval":
        lo, hi = opts.interval
        g = CFGInterval(guidance_scale=scale, sigma_low=lo, sigma_high=hi)
    return g


def settings(g) -> dict:
    """JSON-ready settings of a guider (what produced the figure)."""
    if g is None:
        return {"guidance": None}
    cfg = {k: v for k, v in dict(g.config).items() if not k.startswith("_")}
    return {"guidance": type(g).__name__, **cfg}


def measure(pipe, method: str, scale: float, opts: FrontsBenchmark, results: Results | None = None) -> dict:
    first_k, matched = None, None
    if method.startswith(EQUAL_NFE):
        matched = method.split(":", 1)[1]
        adaptive = results.find(method=matched, scale=scale)
        if adaptive is None:
            return None
        first_k = int(round(adaptive["nfe"] - opts.steps))
        method = EQUAL_NFE
    g = guider(pipe, method, scale, opts, first_k)
    truncation: list[int] = []

    def record_truncation(_output, _start, _stop):
        if isinstance(g, AdaptiveGuidance):
            truncation.extend(opts.steps if s is None else s for s in g.truncation_step)

    res = evaluate_pipeline(pipe, opts.n, seed=0, batch_size=opts.batch_size, progress=False,
                            num_inference_steps=opts.steps, guidance=g, guidance_scale=scale if g else 1.0,
                            on_batch=record_truncation)
    cell = {"fid": res.fid, "accuracy": res.accuracy, "precision": res.precision, "recall": res.recall,
            "kid": res.kid, "nfe": res.nfe, "seconds_per_image_eval": res.seconds_per_image,
            "settings": settings(g), "n": res.num_samples}
    if matched:
        cell.update(matched_to=matched, first_k_steps=first_k)
    if truncation:
        cell["mean_truncation_step"] = sum(truncation) / len(truncation)
    return cell


def wall_time(pipe, opts: FrontsBenchmark) -> list[dict]:
    """Seconds per image of every method at ``time_scale`` and each batch size, interleaved repeats, median."""
    rows = []
    for batch in opts.time_batches:
        labels = [i % 10 for i in range(batch)]
        times: dict[str, list[float]] = {m: [] for m in opts.methods}
        nfe: dict[str, float] = {}
        for method in opts.methods:  # warm-up (and the NFE of this batch)
            g = guider(pipe, method, opts.time_scale, opts)
            out = pipe(labels, num_inference_steps=opts.steps, guidance=g, guidance_scale=opts.time_scale if g else 1.0,
                       seed=0, output_type="latent")
            nfe[method] = float(out.nfe)
        for _ in range(opts.repeats):
            for method in opts.methods:
                g = guider(pipe, method, opts.time_scale, opts)
                t0 = time.perf_counter()
                pipe(labels, num_inference_steps=opts.steps, guidance=g,
                     guidance_scale=opts.time_scale if g else 1.0, seed=0, output_type="latent")
                times[method].append((time.perf_counter() - t0) / batch)
        cfg = statistics.median(times["cfg"]) if "cfg" in times else None
        for method in opts.methods:
            med = statistics.median(times[method])
            rows.append({"method": method, "batch": batch, "scale": opts.time_scale, "nfe": nfe[method],
                         "seconds_per_image": med, "repeats": opts.repeats,
                         "time_ratio_vs_cfg": med / cfg if cfg else None,
                         "nfe_ratio_vs_cfg": nfe[method] / nfe["cfg"] if "cfg" in nfe else None})
        print(f"wall time batch {batch}: " + ", ".join(f"{r['method']} {r['seconds_per_image'] * 1e3:.1f} ms"
                                                       for r in rows if r["batch"] == batch), flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- fronts
def curve(cells: list[dict], method: str) -> list[tuple[float, float, float]]:
    """(accuracy, fid, nfe) of ``method``'s scale sweep, starting at the unguided point, by scale."""
    rows = sorted((c for c in cells if c["method"] == method), key=lambda c: c["scale"])
    start = [c for c in cells if c["method"] == "none"]
    return [(c["accuracy"], c["fid"], c["nfe"]) for c in start + rows]


def at_accuracy(points: list[tuple[float, float, float]], acc: float) -> float | None:
    """FID of the piecewise-linear sweep at accuracy ``acc`` (lowest FID where it passes ``acc`` more than once;
    ``None`` where the sweep never reaches it)."""
    best = None
    for (a0, f0, _), (a1, f1, _) in zip(points, points[1:]):
        lo, hi = min(a0, a1), max(a0, a1)
        if lo <= acc <= hi:
            f = f0 if a1 == a0 else f0 + (f1 - f0) * (acc - a0) / (a1 - a0)
            best = f if best is None else min(best, f)
    return best


def compare(data: dict) -> dict:
    """Per method and scale: the baselines' FID at the same accuracy and whether the point lies below both."""
    cells = data["cells"]
    base = {m: curve(cells, m) for m in BASELINES}
    out: dict = {}
    for c in cells:
        if c["method"] in ("none", "cfg") or c["method"].startswith(EQUAL_NFE):
            continue
        row = {"accuracy": c["accuracy"], "fid": c["fid"], "nfe": c["nfe"]}
        below = []
        for m in BASELINES:
            if m == c["method"]:
                continue
            f = at_accuracy(base[m], c["accuracy"])
            row[f"{m}_fid_at_same_accuracy"] = f
            below.append(None if f is None else c["fid"] < f)
        row["below_baselines"] = None if any(b is None for b in below) else all(below)
        equal = next((e for e in cells if e["method"] == f"{EQUAL_NFE}:{c['method']}" and e["scale"] == c["scale"]), None)
        if equal is not None:
            row["equal_nfe_baseline"] = {k: equal[k] for k in ("fid", "accuracy", "nfe", "first_k_steps")}
            row["beats_equal_nfe_baseline"] = c["fid"] < equal["fid"] and c["accuracy"] >= equal["accuracy"]
        out.setdefault(c["method"], {})[f"{c['scale']:g}"] = row
    verdict = {}
    for method, rows in out.items():
        wins = [s for s, r in rows.items() if r["below_baselines"]]
        unmatched = [s for s, r in rows.items() if r["below_baselines"] is None]
        verdict[method] = {"beats_baselines_at_scales": wins, "no_baseline_at_that_accuracy": unmatched,
                           "beats_cfg_at_matched_accuracy": bool(wins)}
        if method in ADAPTIVE:
            verdict[method]["beats_equal_nfe_interval_at_scales"] = [
                s for s, r in rows.items() if r.get("beats_equal_nfe_baseline")]
    return {"per_point": out, "verdict": verdict}


def plot(data: dict, path: Path) -> None:
    plt = pyplot()
    cells = data["cells"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    none = [c for c in cells if c["method"] == "none"]
    for i, method in enumerate([m for m in METHODS if m != "none"] + [f"{EQUAL_NFE}:{m}" for m in ADAPTIVE]):
        rows = none + sorted((c for c in cells if c["method"] == method), key=lambda c: c["scale"])
        if len(rows) <= len(none):
            continue
        style = dict(marker="o", color=f"C{i}", label=method,
                     linestyle="--" if method in BASELINES else ":" if method.startswith(EQUAL_NFE) else "-")
        axes[0].plot([c["accuracy"] for c in rows], [c["fid"] for c in rows], **style)
        for c in rows[len(none):]:
            axes[0].annotate(f"{c['scale']:g}", (c["accuracy"], c["fid"]), fontsize=6, color=f"C{i}")
        axes[1].plot([c["recall"] for c in rows], [c["precision"] for c in rows], **style)
        axes[2].plot([c["nfe"] for c in rows], [c["fid"] for c in rows], **style)
    for c in none:
        for ax, (x, y) in zip(axes, ((c["accuracy"], c["fid"]), (c["recall"], c["precision"]), (c["nfe"], c["fid"]))):
            ax.scatter([x], [y], color="k", marker="*", s=90, zorder=5, label="no guidance")
    axes[0].set(xlabel="class accuracy", ylabel="FID (digits features)", title="FID vs accuracy (labels: w)")
    axes[1].set(xlabel="recall", ylabel="precision", title="precision vs recall")
    axes[2].set(xlabel="NFE per image", ylabel="FID", title="FID vs NFE")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    cfg = data["config"]
    fig.suptitle(f"builtin:{cfg['model']}, {cfg['steps']} steps, n={cfg['n']} per point, CPU ({cfg['machine']})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(data: dict) -> str:
    """Markdown: one row per (method, scale): accuracy, FID, baselines' FID at that accuracy, verdict, NFE."""
    comp = compare(data)["per_point"]
    lines = ["| method | w | accuracy | FID | CFG FID at same acc. | interval FID at same acc. | below both? | NFE |",
             "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, p=2: "–" if v is None else f"{v:.{p}f}"  # noqa: E731
    order = lambda c: (METHODS.index(c["method"].split(":")[-1]) + 0.5 * c["method"].startswith(EQUAL_NFE), c["scale"])  # noqa: E731
    for c in sorted(data["cells"], key=order):
        r = comp.get(c["method"], {}).get(f"{c['scale']:g}", {})
        verdict = {True: "yes", False: "no", None: "no match"}[r.get("below_baselines")] if r else ""
        lines.append(f"| {c['method']} | {c['scale']:g} | {c['accuracy'] * 100:.1f}% | {c['fid']:.2f} | "
                     f"{fmt(r.get('cfg_fid_at_same_accuracy'))} | {fmt(r.get('cfg-interval_fid_at_same_accuracy'))} | "
                     f"{verdict} | {c['nfe']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    opts = parse_options(FrontsBenchmark, argv)
    if set(opts.methods) - set(METHODS) or "cfg" not in opts.methods:
        raise SystemExit(f"--methods must be among {list(METHODS)} and include cfg, got {opts.methods}")
    if len(opts.interval) != 2:
        raise SystemExit(f"--interval takes two numbers (sigma_low sigma_high), got {opts.interval}")
    out = opts.out or f"benchmarks/results/guidance_fronts_{opts.model}.json"
    pipe = builtin_pipeline(opts.model, opts.threads)
    config = {"model": opts.model, "n": opts.n, "steps": opts.steps, "scales": opts.scales,
              "interval_sigma": opts.interval, "scheduler": type(pipe.scheduler).__name__,
              "seeds": f"0..{opts.n - 1}, digit = seed % 10", "reference": "builtin:digits (train split statistics)",
              "settings_source": f"fastgen/assets/{opts.model}/guidance.json (names resolved by the pipeline)",
              "torch_threads": opts.threads, "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} thread(s)",
              "torch": torch.__version__}
    results = Results(out, config, resume_on=("model", "n", "steps", "interval_sigma"), fresh=opts.fresh)
    cells = [("none", 1.0)] if "none" in opts.methods else []
    cells += [(m, s) for s in opts.scales for m in opts.methods if m != "none"]
    cells += [(f"{EQUAL_NFE}:{m}", s) for s in opts.scales for m in opts.methods if m in ADAPTIVE]
    results.run(cells, key=lambda c: {"method": c[0], "scale": c[1]},
                measure=lambda c: measure(pipe, *c, opts, results),
                plot=plot, after=lambda data: data.update(fronts=compare(data)))
    if opts.repeats > 0 and not results.data.get("wall_time"):
        results.data["wall_time"] = wall_time(pipe, opts)
    results.data["fronts"] = compare(results.data)
    results.save()
    results.plot(plot)
    print(table(results.data))


if __name__ == "__main__":
    main()
