"""DisBack vs its base over several training seeds: the targets on the seed-mean FID curves.

Zhang et al., arXiv:2408.15991. Each input is a per-seed record of ``benchmarks/distill_disback.py`` (a DisBack run
and its base run, same recipe, seed and initial student). Single evaluations on the digits plateau move by 1-2 FID
from one to the next, so one seed's "base final FID" is mostly that checkpoint's luck; averaging the curves of
several training seeds at each update count shrinks that noise by the square root of the seed count. The targets
(issue 12) are applied to the mean curves with :func:`distill_disback.compare`, the same rule as one seed's: the mean
DisBack curve reaches the mean base curve's final FID within 70% of the base's updates, and ends no worse. The
per-seed verdicts are kept beside it. Writes a JSON record and a PNG plot (mean curves bold, seeds faint).

    python benchmarks/distill_disback_seeds.py --out benchmarks/results/distill_disback_t700_seeds.json \\
        --groups "DisBack, t* 700=benchmarks/results/distill_disback_t700.json,...seed1.json,..." \\
                 "DisBack + discriminator recording=..."
"""
from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill import split_label  # noqa: E402
from distill_disback import compare  # noqa: E402  (one rule for one seed and for the seed means)

from fastgen.benchmarking import curve_colour, parse_options, portable, pyplot, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class DisBackSeeds:
    """DisBack vs its base over training seeds: the targets on the seed-mean curves."""

    groups: list[str] = field(default_factory=list, metadata={
        "help": "LABEL=rec.json,rec.json,...: one DisBack variant, one benchmarks/distill_disback.py record per "
                "training seed (each holds its DisBack run and its base run); several groups share one plot"})
    out: str = field(default=str(RESULTS / "distill_disback_seeds.json"), metadata={"help": "results JSON (PNG beside it)"})
    note: str = field(default="", metadata={"help": "free text kept in the record"})


def mean_curve(curves: list[list[dict]]) -> list[dict]:
    """``{"updates", "fid", "fid_std", "seeds"}`` at every update count (>= 0) that every curve evaluated."""
    import numpy as np

    by_update = [{r["updates"]: r["fid"] for r in c if r["updates"] >= 0 and r["fid"] is not None} for c in curves]
    rows = []
    for u in sorted(set.intersection(*map(set, by_update))):
        fids = np.array([fid[u] for fid in by_update], dtype=float)
        rows.append({"updates": u, "fid": float(fids.mean()), "fid_std": float(fids.std(ddof=1)) if len(fids) > 1 else 0.0,
                     "seeds": len(fids)})
    return rows


def group_record(label: str, paths: list[str]) -> dict:
    records = [json.loads(Path(p).read_text()) for p in paths]
    disback = [r["disback"] for r in records]
    base = [r["base"] for r in records]
    mean_disback, mean_base = mean_curve(disback), mean_curve(base)
    return {"label": label, "records": [portable(p) for p in paths],
            "seeds": [{"record": portable(p), "disback": r["config"]["disback"], "base": r["config"]["base"],
                       "summary": r["summary"]} for p, r in zip(paths, records)],
            "per_seed": {k: sum(bool(r["summary"][k]) for r in records)
                         for k in ("reaches_within_70_percent", "ends_no_worse", "target_met")},
            "summary": compare(mean_disback, mean_base), "mean_disback": mean_disback, "mean_base": mean_base,
            "curves": {"disback": disback, "base": base}}


def main(argv=None) -> None:
    opts = parse_options(DisBackSeeds, argv)
    if not opts.groups:
        raise ValueError("groups: pass at least one LABEL=record.json,record.json,... group.")
    groups = []
    for spec in opts.groups:
        label, paths = split_label(spec)
        paths = [p for p in paths.split(",") if p]
        if not label or len(paths) < 2:
            raise ValueError(f"groups: each group is LABEL=rec.json,rec.json,... with 2 or more records, got {spec!r}.")
        groups.append(group_record(label, paths))
    record = {"config": {**asdict(opts), "out": portable(opts.out)},
              "hardware": f"{platform.machine()} CPU, {os.cpu_count()} cores, 1 torch thread, shared with other jobs",
              "groups": groups}
    out = write_json(opts.out, record)
    plot(record, out.with_suffix(".png"))
    for g in groups:
        print(g["label"], json.dumps({**g["summary"], "per_seed": g["per_seed"], "seeds": len(g["seeds"])}))


def plot(record: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(1, 1, figsize=(7.5, 4.5))
    shown_bases = set()
    count = len(record["groups"])
    for i, g in enumerate(record["groups"]):
        colour = curve_colour(plt, i, count + 1)
        for c in g["curves"]["disback"]:
            ax.plot([r["updates"] for r in c if r["updates"] > 0], [r["fid"] for r in c if r["updates"] > 0],
                    color=colour, lw=0.6, alpha=0.3)
        m = g["mean_disback"]
        ax.plot([r["updates"] for r in m], [r["fid"] for r in m], marker="o", ms=3, color=colour, lw=2,
                label=f"{g['label']}: mean of {len(g['seeds'])} seeds")
        bases = tuple(seed["base"] for seed in g["seeds"])  # groups that share their base runs draw them once
        if bases in shown_bases:
            continue
        j = len(shown_bases)
        shown_bases.add(bases)
        style = ("-", "--", ":")[j % 3]
        for c in g["curves"]["base"]:
            ax.plot([r["updates"] for r in c], [r["fid"] for r in c], color="black", ls=style, lw=0.6, alpha=0.25)
        m = g["mean_base"]
        ax.plot([r["updates"] for r in m], [r["fid"] for r in m], marker="s", ms=3, color="black", ls=style, lw=1.6,
                label=f"base of \"{g['label']}\": mean of {len(g['seeds'])} seeds")
        final = g["summary"]["base_final_fid"]
        ax.axhline(final, ls=style, color="grey", lw=0.8)
        ax.text(140 * j, final, f" base's mean final FID {final:.2f}", fontsize=7, va="top" if j % 2 else "bottom",
                color="grey")
    updates = record["groups"][0]["summary"]["base_final_updates"]
    ax.axvline(0.7 * updates, ls=":", color="tab:red", lw=0.8)
    ax.text(0.7 * updates, 60, " 70% of the base's updates", fontsize=7, color="tab:red", va="top")
    ax.set(xlabel="generator updates", ylabel="digits FID (2,000 fixed seeds)", yscale="log", ylim=(3, 200),
           title="DisBack vs base over training seeds (faint: single seeds)")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
