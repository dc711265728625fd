"""Solver benchmark on the built-in digits model: FID (digits features) vs NFE, with and without teleport.

Teleport statistics: ``data`` = one Gaussian for all digits (``stats.safetensors``); ``class-guided`` =
one Gaussian per class plus the unconditional one (``class_stats.safetensors``), following the
CFG-guided Gaussian ODE (``--teleport-stats data class-guided``).

Compares diffusers' DPM-Solver++(2M), UniPC, DEIS and DDIM (built from the model's scheduler config, as
``solver=`` resolves them), the USF default schedule, and S³-searched schedules
(``fastgen/assets/digits-schedules/nfe{N}.json``), each at equal NFE with and without analytical
teleportation (``fastgen/assets/digits-teleport/stats.safetensors``, teleport_fraction ~0.2: the grid has
M steps with M - round(0.2 M) = NFE). CFG scale 3; identical seeds and labels for every configuration.

Every configuration is scored by :func:`fastgen.metrics.evaluate_pipeline` (sample i: seed i, digit i % 10)
against the shipped train-split statistics (``builtin:digits``). Resumable: finished configurations are kept
in the results JSON and skipped on re-runs (:mod:`fastgen.benchmarking`).

**Solver accuracy beside FID** (``--reference_steps K``): every configuration also gets ``rms_to_reference``,
the RMS distance (images in [0, 1]) of its samples to the same seeds' reference solution of the guided ODE
(:func:`fastgen.metrics.reference_solution`: K steps of DPM-Solver++(2M), same labels and CFG scale; cached
under ``out/cache/``). A low FID with a large distance means the solver lands somewhere the FID likes rather
than on the ODE's solution. ``s3`` are the FID-searched schedules (the paper's fitness), ``s3-rms`` schedules
searched with ``fastgen search-schedule --metric rms`` (``--rms_schedules``), so both fitnesses are side by side.
``--model digits-small`` runs the second workload (its S³ schedules in ``--schedules``).

**Wall time beside NFE** (``--repeats R``): seconds per image of ``--time_configs`` (``solver@nfe`` or
``solver@nfe+teleport``) at each ``--time_batches`` size, measured in one process with R interleaved
repeats (median).

    python benchmarks/solvers.py --samples 2000 --nfe 4 5 6 8 10 20
    python benchmarks/solvers.py --samples 500 --nfe 5 10 20 --reference_steps 200 --repeats 5 \\
        --out benchmarks/results/solvers_accuracy_digits.json
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import fastgen
from fastgen.benchmarking import Results, builtin_pipeline, parse_options, portable, pyplot

ASSETS = Path(fastgen.__file__).resolve().parent / "assets"
SCHEDULES = ASSETS / "digits-schedules"
TELEPORT_KINDS = {"data": ASSETS / "digits-teleport" / "stats.safetensors",
                  "class-guided": ASSETS / "digits-teleport" / "class_stats.safetensors"}
SOLVERS = ["dpmsolver++", "unipc", "deis", "ddim", "usf-default", "s3", "s3-rms"]
DIRS = {}  # "s3" / "s3-rms" -> folder of nfe{N}.json schedules (set from the options in main)


@dataclass
class SolverBenchmark:
    """Solver benchmark on the built-in digits model: FID vs NFE, with and without teleport."""

    samples: int = field(default=2000, metadata={"help": "samples per configuration (seeds 0..samples-1)"})
    nfe: list[int] = field(default_factory=lambda: [4, 5, 6, 8, 10, 20])
    solvers: list[str] = field(default_factory=lambda: list(SOLVERS), metadata={"help": f"among {SOLVERS}"})
    teleport_max_nfe: int = field(default=20, metadata={"help": "run teleport variants up to this NFE"})
    fraction: float = field(default=0.2, metadata={"help": "teleport fraction"})
    teleport_stats: list[str] = field(default_factory=lambda: ["data"], metadata={
        "help": "teleport statistics: 'data' (one Gaussian for all digits) and/or 'class-guided' (one per class; "
                "guided ODE under CFG)"})
    no_plain: bool = field(default=False, metadata={"help": "skip the configurations without teleport"})
    scale: float = 3.0
    model: str = field(default="digits", metadata={"help": "built-in model: digits or digits-small"})
    reference_steps: int = field(default=0, metadata={
        "help": "DPM-Solver++ steps of the reference solution for rms_to_reference (0: no distance)"})
    schedules: str = field(default="", metadata={
        "help": "folder of the FID-searched S3 schedules (default: the shipped digits-schedules for digits)"})
    rms_schedules: str = field(default="", metadata={
        "help": "folder of S3 schedules searched with --metric rms (default benchmarks/results/s3_rms/<model>)"})
    repeats: int = field(default=0, metadata={"help": "interleaved wall-time repeats (0: no timing)"})
    time_batches: list[int] = field(default_factory=lambda: [4, 100])
    time_configs: list[str] = field(default_factory=lambda: [
        "dpmsolver++@20", "dpmsolver++@10", "dpmsolver++@5", "s3@5", "s3-rms@5", "dpmsolver++@5+teleport"])
    batch_size: int = 500
    threads: int = 1
    out: str = "benchmarks/results/solvers.json"
    summarise: bool = field(default=False, metadata={"help": "only recompute the summary and plot of --out"})
    table: bool = field(default=False, metadata={"help": "print --out as a markdown table and exit"})


def teleport_grid(nfe: int, fraction: float) -> int:
    """Smallest grid M whose teleport skips round(fraction*M) steps and leaves exactly ``nfe`` evaluations."""
    m = nfe
    while m - int(round(fraction * m)) != nfe:
        m += 1
    return m


def call_kwargs(solver: str, nfe: int, kind: str | None, fraction: float) -> dict | None:
    """Pipeline arguments of one configuration (``None``: no S³ schedule was searched for it)."""
    from fastgen.solvers import SolverSchedule
    from fastgen.solvers.evaluate import schedule_call_kwargs
    from fastgen.teleport import resolve_teleport

    stats = resolve_teleport(str(TELEPORT_KINDS[kind])) if kind else None
    if solver in ("s3", "s3-rms"):
        path = Path(DIRS.get(solver, SCHEDULES)) / (f"nfe{nfe}-teleport.json" if kind else f"nfe{nfe}.json")
        return schedule_call_kwargs(SolverSchedule.load(path), stats) if path.is_file() else None
    if kind:
        return schedule_call_kwargs((solver, teleport_grid(nfe, fraction), stats, fraction))
    return schedule_call_kwargs((solver, nfe, None, 0.0))


def reference(pipe, opts: SolverBenchmark):
    """The reference solution of the guided ODE for seeds 0..samples-1 (cached under out/cache/), or None."""
    import torch

    from fastgen.metrics import reference_solution

    if opts.reference_steps <= 0:
        return None
    cache = Path("out/cache") / f"reference_{opts.model}_w{opts.scale:g}_n{opts.samples}_dpm{opts.reference_steps}.pt"
    if cache.is_file():
        return torch.load(cache, weights_only=True)
    t0 = time.perf_counter()
    ref = reference_solution(pipe, opts.samples, seed=0, steps=opts.reference_steps, guidance_scale=opts.scale,
                             batch_size=opts.batch_size)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ref, cache.with_suffix(".tmp"))
    cache.with_suffix(".tmp").replace(cache)
    print(f"reference solution ({opts.reference_steps} steps, {opts.samples} samples): "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return ref


def measure(pipe, opts: SolverBenchmark, solver: str, nfe: int, kind: str | None, ref=None) -> dict | None:
    from fastgen.metrics import evaluate_pipeline

    kwargs = call_kwargs(solver, nfe, kind, opts.fraction)
    if kwargs is None:
        return None
    res = evaluate_pipeline(pipe, opts.samples, seed=0, batch_size=opts.batch_size, progress=False,
                            guidance_scale=opts.scale, reference_samples=ref, **kwargs)
    rec = {"fid": res.fid, "kid": res.kid, "precision": res.precision, "recall": res.recall, "accuracy": res.accuracy,
           "roughness": res.roughness, "nfe_with_guidance": res.nfe, "seconds": round(res.wall_seconds, 1)}
    if ref is not None:
        rec.update(rms_to_reference=res.rms_to_reference, reference=f"dpmsolver++ {opts.reference_steps} steps")
    if solver in ("s3", "s3-rms"):
        schedule = kwargs["solver"]
        folder = Path(DIRS.get(solver, SCHEDULES))
        rec["schedule"] = str(Path(portable(folder)) / f"nfe{nfe}{'-teleport' if kind else ''}.json")
        rec["search"] = schedule.meta.get("search", {})
    return rec


def parse_time_config(spec: str) -> tuple[str, int, str | None]:
    """``solver@nfe`` or ``solver@nfe+teleport`` -> (solver, nfe, teleport kind)."""
    tele = spec.endswith("+teleport")
    solver, _, nfe = spec[: -len("+teleport")].rpartition("@") if tele else spec.rpartition("@")
    if solver not in SOLVERS or not nfe.isdigit():
        raise SystemExit(f"--time_configs entries must be solver@nfe[+teleport] with solver in {SOLVERS}, got {spec!r}")
    return solver, int(nfe), "data" if tele else None


def wall_time(pipe, opts: SolverBenchmark) -> list[dict]:
    """Seconds per image of each ``--time_configs`` entry per batch size: interleaved repeats, median."""
    configs = {spec: call_kwargs(*parse_time_config(spec), opts.fraction) for spec in opts.time_configs}
    configs = {k: v for k, v in configs.items() if v is not None}
    rows = []
    for batch in opts.time_batches:
        labels = [i % 10 for i in range(batch)]
        times: dict[str, list[float]] = {k: [] for k in configs}
        nfe = {}
        for spec, kw in configs.items():  # warm-up
            nfe[spec] = float(pipe(labels, seed=0, guidance_scale=opts.scale, output_type="latent", **kw).nfe)
        for _ in range(opts.repeats):
            for spec, kw in configs.items():
                t0 = time.perf_counter()
                pipe(labels, seed=0, guidance_scale=opts.scale, output_type="latent", **kw)
                times[spec].append((time.perf_counter() - t0) / batch)
        base = opts.time_configs[0] if opts.time_configs[0] in times else None
        for spec in configs:
            med = statistics.median(times[spec])
            rows.append({"config": spec, "batch": batch, "nfe_with_guidance": nfe[spec], "seconds_per_image": med,
                         "repeats": opts.repeats, "baseline": base,
                         "time_ratio": med / statistics.median(times[base]) if base else None,
                         "nfe_ratio": nfe[spec] / nfe[base] if base else None})
        print(f"wall time batch {batch}: " + ", ".join(f"{r['config']} {r['seconds_per_image'] * 1e3:.1f} ms"
                                                       for r in rows if r["batch"] == batch), flush=True)
    return rows


def plot(data: dict, path: Path) -> None:
    plt = pyplot()
    results = data["cells"]
    distance = any(r.get("rms_to_reference") is not None for r in results)
    fig, axes = plt.subplots(1, 2 if distance else 1, figsize=(15 if distance else 9.5, 4.5), squeeze=False)
    ax = axes[0, 0]
    styles = {None: "-", "data": "--", "class-guided": ":"}
    for i, solver in enumerate(SOLVERS):
        for kind, ls in styles.items():
            rows = sorted((r for r in results if r["solver"] == solver and _kind(r) == kind), key=lambda r: r["nfe"])
            if rows:
                style = dict(marker="o", color=f"C{i}", linestyle=ls,
                             label=f"{solver}{'' if kind is None else ' + teleport (' + kind + ')'}")
                ax.plot([r["nfe"] for r in rows], [r["fid"] for r in rows], **style)
                if distance:
                    axes[0, 1].plot([r["nfe"] for r in rows], [r.get("rms_to_reference") for r in rows], **style)
    if distance:
        axes[0, 1].set(xlabel="NFE (per sample, guidance excluded)", ylabel="RMS distance to the reference solution",
                       yscale="log", title="solver accuracy (images in [0, 1])")
    ax.set_xlabel("NFE (per sample, guidance excluded)")
    ax.set_ylabel("FID (digits features)")
    ax.set_yscale("log")
    ticks = [2, 3, 4, 5, 6, 8, 10, 15, 20]
    ax.set_yticks(ticks)
    ax.set_yticklabels([str(t) for t in ticks])
    ax.minorticks_off()
    cfg = data["config"]
    n = sorted({r.get("samples") for r in results if r.get("samples")})
    ax.set_title(f"{cfg.get('model', 'digits')}, CFG {cfg['guidance_scale']:g}, n={'/'.join(map(str, n))} per point (CPU): "
                 "FID vs NFE", fontsize=9)
    (axes[0, 1] if distance else ax).legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _kind(r: dict):
    """None without teleport, else which statistics it used."""
    return r.get("teleport_stats") if r["teleport"] else None


def summarise(results: list[dict]) -> dict:
    """The issue's targets, from whatever configurations have been measured."""
    def fid(solver, nfe, kind=None):
        vals = [r["fid"] for r in results if (r["solver"], r["nfe"], _kind(r)) == (solver, nfe, kind)]
        return vals[-1] if vals else None
    diffusers = ("dpmsolver++", "unipc", "deis", "ddim")
    out: dict = {}
    best5 = min((f for f in (fid(s, 5) for s in diffusers) if f is not None), default=None)
    best10 = min((f for f in (fid(s, 10) for s in diffusers) if f is not None), default=None)
    s3 = fid("s3", 5)
    if best5 is not None and s3 is not None:
        out["s3_nfe5_vs_best_diffusers_nfe5"] = {"s3": s3, "best_diffusers": best5, "reduction": 1 - s3 / best5,
                                                 "target": ">= 0.25", "met": 1 - s3 / best5 >= 0.25}
    if best10 is not None and s3 is not None:
        out["s3_nfe5_vs_best_diffusers_nfe10"] = {"s3": s3, "best_diffusers_nfe10": best10, "met": s3 <= best10}
    for kind in ("data", "class-guided"):
        tele = {}
        for r in results:
            if _kind(r) == kind and r["nfe"] <= 8:
                base = fid(r["solver"], r["nfe"])
                if base is not None:
                    tele[f"{r['solver']}@{r['nfe']}"] = {"without": base, "with": r["fid"], "lower": r["fid"] < base}
        if tele:
            out[f"teleport_lowers_fid[{kind}]"] = {
                "per_config": tele, "all": all(v["lower"] for v in tele.values()),
                "lowered": sum(v["lower"] for v in tele.values()), "configs": len(tele)}
    cost = {}
    for r in results:
        if r["solver"].startswith("s3") and r.get("search"):
            srch = r["search"]
            prefix = "" if r["solver"] == "s3" else f"{r['solver']}:"
            cost[f"{prefix}nfe{r['nfe']}{'-teleport' if r['teleport'] else ''}"] = {
                "evaluations": srch.get("evaluations"), "samples_per_evaluation": srch.get("samples"),
                "metric": srch.get("metric"), "cpu_minutes": round(srch.get("eval_seconds", 0.0) / 60, 1)}
    out["search_cost"] = cost
    return out


def accuracy_table(results: list[dict]) -> str:
    """Markdown: one row per (solver, teleport, NFE): FID, class accuracy, RMS distance to the reference."""
    lines = ["| solver | NFE | FID | accuracy | RMS to reference | search fitness |", "|---|---|---|---|---|---|"]
    order = {s: i for i, s in enumerate(SOLVERS)}
    for r in sorted(results, key=lambda r: (r["nfe"], order[r["solver"]], str(_kind(r)))):
        name = r["solver"] + ("" if _kind(r) is None else f" + teleport ({_kind(r)})")
        rms = r.get("rms_to_reference")
        fitness = r.get("search", {}).get("metric", "") if r["solver"].startswith("s3") else ""
        lines.append(f"| {name} | {r['nfe']} | {r['fid']:.2f} | {r['accuracy'] * 100:.1f}% | "
                     f"{'–' if rms is None else f'{rms:.4f}'} | {fitness} |")
    return "\n".join(lines)


def table(results: list[dict]) -> str:
    """Markdown table: one row per solver and teleport variant, one column per NFE (FID)."""
    nfes = sorted({r["nfe"] for r in results})
    lines = ["| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
    for solver in SOLVERS:
        for kind in (None, "data", "class-guided"):
            cells = {r["nfe"]: r["fid"] for r in results if r["solver"] == solver and _kind(r) == kind}
            if cells:
                name = solver + ("" if kind is None else f" + teleport ({kind})")
                lines.append(f"| {name} | " + " | ".join(f"{cells[n]:.2f}" if n in cells else "" for n in nfes) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    opts = parse_options(SolverBenchmark, argv)
    bad = sorted(set(opts.solvers) - set(SOLVERS)) + sorted(set(opts.teleport_stats) - set(TELEPORT_KINDS))
    if bad:
        raise SystemExit(f"unknown --solvers/--teleport_stats {bad}: choose from {SOLVERS} and {sorted(TELEPORT_KINDS)}")
    DIRS["s3"] = opts.schedules or (str(SCHEDULES) if opts.model == "digits" else f"benchmarks/results/s3_fid/{opts.model}")
    DIRS["s3-rms"] = opts.rms_schedules or f"benchmarks/results/s3_rms/{opts.model}"
    config = {"guidance_scale": opts.scale, "teleport_fraction": opts.fraction,
              "teleport_stats": {k: f"fastgen/assets/digits-teleport/{v.name}" for k, v in TELEPORT_KINDS.items()},
              "fid_reference": "builtin:digits (train split statistics)", "features": "digits-features",
              "seeds": "sample i: seed i, digit i % 10"}
    if opts.model != "digits" or opts.reference_steps or opts.repeats:  # keys of the original file stay as they were
        config.update(model=opts.model, reference_steps=opts.reference_steps,
                      schedules={k: portable(v) for k, v in DIRS.items()},
                      machine=f"{platform.machine()} CPU, {opts.threads} torch thread(s)")
    results = Results(opts.out, config, resume_on=("guidance_scale", "teleport_fraction", "model", "reference_steps"))
    if opts.table:
        print(table(results.cells))
        if any(r.get("rms_to_reference") is not None for r in results.cells):
            print()
            print(accuracy_table(results.cells))
        return
    if opts.summarise:
        results.data["summary"] = summarise(results.cells)
        results.save()
        results.plot(plot)
        print(json.dumps(results.data["summary"], indent=1))
        return
    pipe = builtin_pipeline(opts.model, opts.threads)
    ref = reference(pipe, opts)
    kinds = ([] if opts.no_plain else [None]) + list(opts.teleport_stats)
    cells = [(solver, nfe, kind) for nfe in opts.nfe for kind in kinds for solver in opts.solvers
             if (kind is None or nfe <= opts.teleport_max_nfe)
             and not (kind == "class-guided" and solver.startswith("s3"))]  # S³ teleport schedules: data statistics
    results.run(cells, key=lambda c: {"solver": c[0], "nfe": c[1], "teleport": c[2] is not None, "teleport_stats": c[2],
                                      "samples": opts.samples},
                measure=lambda c: measure(pipe, opts, *c, ref=ref), plot=plot,
                after=lambda data: data.update(summary=summarise(data["cells"])))
    if opts.repeats > 0:
        results.data["wall_time"] = wall_time(pipe, opts)
        results.save()


if __name__ == "__main__":
    main()
