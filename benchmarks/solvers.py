"""Solver benchmark on the built-in digits model: FID (digits features) vs NFE, with and without teleport.

Teleport statistics: ``data`` = one Gaussian for all digits (``stats.safetensors``); ``class-guided`` =
one Gaussian per class plus the unconditional one (``class_stats.safetensors``), following the
CFG-guided Gaussian ODE (``--teleport-stats data class-guided``).

Compares diffusers' DPM-Solver++(2M), UniPC, DEIS and DDIM (built from the model's scheduler config, as
``solver=`` resolves them), the USF default schedule, and S³-searched schedules
(``fastgen/assets/digits-schedules/nfe{N}.json``), each at equal NFE with and without analytical
teleportation (``fastgen/assets/digits-teleport/stats.safetensors``, teleport_fraction ~0.2: the grid has
M steps with M - round(0.2 M) = NFE). CFG scale 3; identical seeds and labels for every configuration.

Resumable: finished configurations are kept in the results JSON and skipped on re-runs.

    python benchmarks/solvers.py --samples 2000 --nfe 4 5 6 8 10 20
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SCHEDULES = REPO / "fastgen" / "assets" / "digits-schedules"
STATS = REPO / "fastgen" / "assets" / "digits-teleport" / "stats.safetensors"
CLASS_STATS = REPO / "fastgen" / "assets" / "digits-teleport" / "class_stats.safetensors"
TELEPORT_KINDS = {"data": STATS, "class-guided": CLASS_STATS}
SOLVERS = ["dpmsolver++", "unipc", "deis", "ddim", "usf-default", "s3"]


def teleport_grid(nfe: int, fraction: float) -> int:
    """Smallest grid M whose teleport skips round(fraction*M) steps and leaves exactly ``nfe`` evaluations."""
    m = nfe
    while m - int(round(fraction * m)) != nfe:
        m += 1
    return m


def run_config(pipe, fid, solver: str, nfe: int, teleport: bool, samples: int, scale: float, fraction: float,
               kind: str = "data"):
    from fastgen.solvers import SolverSchedule
    from fastgen.solvers.evaluate import run_schedule
    from fastgen.teleport import resolve_teleport
    labels = [i % pipe.num_classes for i in range(samples)]
    seeds = list(range(samples))
    stats = resolve_teleport(str(TELEPORT_KINDS[kind])) if teleport else None
    if solver == "s3":
        path = SCHEDULES / (f"nfe{nfe}-teleport.json" if teleport else f"nfe{nfe}.json")
        if not path.is_file():
            return None
        spec = SolverSchedule.load(path)
    elif teleport:
        spec = (solver, teleport_grid(nfe, fraction), stats, fraction)
    else:
        spec = (solver, nfe, None, 0.0)
    t0 = time.time()
    x = run_schedule(pipe, spec, labels, seeds, scale, teleport=stats if solver == "s3" else None)
    rec = {"solver": solver, "nfe": nfe, "teleport": teleport, "fid": fid(x), "samples": samples,
           "seconds": round(time.time() - t0, 1)}
    if teleport:
        rec["teleport_stats"] = kind
    if solver == "s3":
        rec["schedule"] = str(path.relative_to(REPO))
        rec["search"] = spec.meta.get("search", {})
    return rec


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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


def _kind(r: dict):
    """None without teleport, else which statistics it used ('data' for records from before the option)."""
    return r.get("teleport_stats", "data") if r["teleport"] else None


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--nfe", type=int, nargs="+", default=[4, 5, 6, 8, 10, 20])
    p.add_argument("--solvers", nargs="+", default=SOLVERS, choices=SOLVERS)
    p.add_argument("--teleport-max-nfe", type=int, default=20, help="run teleport variants up to this NFE")
    p.add_argument("--fraction", type=float, default=0.2, help="teleport fraction")
    p.add_argument("--teleport-stats", nargs="+", default=["data"], choices=sorted(TELEPORT_KINDS),
                   help="teleport statistics: 'data' (one Gaussian for all digits) and/or 'class-guided' "
                        "(one per class; guided ODE under CFG)")
    p.add_argument("--no-plain", action="store_true", help="skip the configurations without teleport")
    p.add_argument("--scale", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "solvers.json"))
    p.add_argument("--summarise", action="store_true", help="only recompute the summary and plot of --out")
    p.add_argument("--table", action="store_true", help="print --out as a markdown table and exit")
    args = p.parse_args()
    if args.table:
        print(table(json.loads(Path(args.out).read_text())["results"]))
        return
    if args.summarise:
        out = Path(args.out)
        data = json.loads(out.read_text())
        data["summary"] = summarise(data["results"])
        out.write_text(json.dumps(data, indent=1) + "\n")
        plot(data["results"], out.with_suffix(".png"))
        print(json.dumps(data["summary"], indent=1))
        return
    torch.set_num_threads(args.threads)
    import fastgen
    from fastgen.solvers.evaluate import DigitsFID
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.is_file() else {"results": []}
    done = {(r["solver"], r["nfe"], _kind(r), r["samples"]) for r in data["results"]}
    pipe = fastgen.load_builtin("digits")
    pipe.set_progress_bar_config(disable=True)
    fid = DigitsFID()
    kinds = ([] if args.no_plain else [None]) + list(args.teleport_stats)
    for nfe in args.nfe:
        for kind in kinds:
            if kind is not None and nfe > args.teleport_max_nfe:
                continue
            for solver in args.solvers:
                if (solver, nfe, kind, args.samples) in done:
                    continue
                if kind == "class-guided" and solver == "s3":
                    continue  # the S³ teleport schedule was searched with the data statistics
                rec = run_config(pipe, fid, solver, nfe, kind is not None, args.samples, args.scale, args.fraction,
                                 kind or "data")
                if rec is None:
                    continue
                data["results"].append(rec)
                data["summary"] = summarise(data["results"])
                data["config"] = {"guidance_scale": args.scale, "teleport_fraction": args.fraction,
                                  "teleport_stats": {k: str(v.relative_to(REPO)) for k, v in TELEPORT_KINDS.items()},
                                  "fid_reference": "eval/digits_train_stats.npz",
                                  "features": "digits-features"}
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(data, indent=1) + "\n")
                print(json.dumps(rec), flush=True)
                plot(data["results"], out.with_suffix(".png"))


if __name__ == "__main__":
    main()
