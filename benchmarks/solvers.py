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

    python benchmarks/solvers.py --samples 2000 --nfe 4 5 6 8 10 20
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import fastgen
from fastgen.benchmarking import Results, parse_options, pyplot

ASSETS = Path(fastgen.__file__).resolve().parent / "assets"
SCHEDULES = ASSETS / "digits-schedules"
TELEPORT_KINDS = {"data": ASSETS / "digits-teleport" / "stats.safetensors",
                  "class-guided": ASSETS / "digits-teleport" / "class_stats.safetensors"}
SOLVERS = ["dpmsolver++", "unipc", "deis", "ddim", "usf-default", "s3"]


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
    if solver == "s3":
        path = SCHEDULES / (f"nfe{nfe}-teleport.json" if kind else f"nfe{nfe}.json")
        return schedule_call_kwargs(SolverSchedule.load(path), stats) if path.is_file() else None
    if kind:
        return schedule_call_kwargs((solver, teleport_grid(nfe, fraction), stats, fraction))
    return schedule_call_kwargs((solver, nfe, None, 0.0))


def measure(pipe, opts: SolverBenchmark, solver: str, nfe: int, kind: str | None) -> dict | None:
    from fastgen.metrics import evaluate_pipeline

    kwargs = call_kwargs(solver, nfe, kind, opts.fraction)
    if kwargs is None:
        return None
    res = evaluate_pipeline(pipe, opts.samples, seed=0, batch_size=opts.batch_size, progress=False,
                            guidance_scale=opts.scale, **kwargs)
    rec = {"fid": res.fid, "kid": res.kid, "precision": res.precision, "recall": res.recall, "accuracy": res.accuracy,
           "roughness": res.roughness, "nfe_with_guidance": res.nfe, "seconds": round(res.wall_seconds, 1)}
    if solver == "s3":
        schedule = kwargs["solver"]
        rec["schedule"] = f"fastgen/assets/digits-schedules/nfe{nfe}{'-teleport' if kind else ''}.json"
        rec["search"] = schedule.meta.get("search", {})
    return rec


def plot(data: dict, path: Path) -> None:
    plt = pyplot()
    results = data["cells"]
    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    styles = {None: "-", "data": "--", "class-guided": ":"}
    for i, solver in enumerate(SOLVERS):
        for kind, ls in styles.items():
            pts = sorted((r["nfe"], r["fid"]) for r in results if r["solver"] == solver and _kind(r) == kind)
            if pts:
                ax.plot(*zip(*pts), marker="o", color=f"C{i}", linestyle=ls,
                        label=f"{solver}{'' if kind is None else ' + teleport (' + kind + ')'}")
    ax.set_xlabel("NFE (per sample, guidance excluded)")
    ax.set_ylabel("FID (digits features)")
    ax.set_yscale("log")
    ticks = [2, 3, 4, 5, 6, 8, 10, 15, 20]
    ax.set_yticks(ticks)
    ax.set_yticklabels([str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_title("digits, CFG 3, 2,000 samples per point (CPU): FID vs NFE")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
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
        if r["solver"] == "s3" and r.get("search"):
            srch = r["search"]
            cost[f"nfe{r['nfe']}{'-teleport' if r['teleport'] else ''}"] = {
                "evaluations": srch.get("evaluations"), "samples_per_evaluation": srch.get("samples"),
                "metric": srch.get("metric"), "cpu_minutes": round(srch.get("eval_seconds", 0.0) / 60, 1)}
    out["search_cost"] = cost
    return out


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
    config = {"guidance_scale": opts.scale, "teleport_fraction": opts.fraction,
              "teleport_stats": {k: f"fastgen/assets/digits-teleport/{v.name}" for k, v in TELEPORT_KINDS.items()},
              "fid_reference": "builtin:digits (train split statistics)", "features": "digits-features",
              "seeds": "sample i: seed i, digit i % 10"}
    results = Results(opts.out, config, resume_on=("guidance_scale", "teleport_fraction"))
    if opts.table:
        print(table(results.cells))
        return
    if opts.summarise:
        results.data["summary"] = summarise(results.cells)
        results.save()
        results.plot(plot)
        print(json.dumps(results.data["summary"], indent=1))
        return
    import torch

    torch.set_num_threads(opts.threads)
    pipe = fastgen.load_builtin("digits")
    pipe.set_progress_bar_config(disable=True)
    kinds = ([] if opts.no_plain else [None]) + list(opts.teleport_stats)
    cells = [(solver, nfe, kind) for nfe in opts.nfe for kind in kinds for solver in opts.solvers
             if (kind is None or nfe <= opts.teleport_max_nfe)
             and not (kind == "class-guided" and solver == "s3")]  # the S³ teleport schedule used the data statistics
    results.run(cells, key=lambda c: {"solver": c[0], "nfe": c[1], "teleport": c[2] is not None, "teleport_stats": c[2],
                                      "samples": opts.samples},
                measure=lambda c: measure(pipe, opts, *c), plot=plot,
                after=lambda data: data.update(summary=summarise(data["cells"])))


if __name__ == "__main__":
    main()
