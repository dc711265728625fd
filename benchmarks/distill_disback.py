"""DisBack vs its base method from the same initial student: digits FID against generator updates.

Zhang et al., arXiv:2408.15991. Reads the in-training evaluations (``train_log.jsonl``: the EMA student on the
run's fixed seeds, sample i: seed i, digit i % 10) of a DisBack run and of its base run (same recipe, seed and
initial student), or the base's evaluations from an earlier record (``benchmarks/results/distill.json``).
DisBack's steps are shifted by its recording stage (``nodes * record_interval`` generator steps in which the
generator does not move), so both curves count generator *updates*. Target (issue 12): DisBack reaches the
base's final FID within 70% of the base's generator updates, and ends no worse (``None`` in the summary: not
measured, e.g. a run stopped early). The recording stage's cost is counted in CPU minutes (the DisBack rows'
``cpu_minutes`` include it), not in updates. Writes
benchmarks/results/distill_disback.json and .png.

    fastgen distill --config distill/digits-disback.yaml --output_dir runs/disback --validation_steps 25  # 100 recording + 400 updates
    python benchmarks/distill_disback.py --disback runs/disback --base "record:benchmarks/results/distill.json:rkl (DMD2)"

A far initial student (``distill_disback_t700.json``): both recipes with ``--student_timesteps 700`` (and
``--validation_steps 25`` for the base), then
``--disback "DisBack over dmd2, t* 700=runs/db700" --base "dmd2, t* 700=runs/b700" --out .../distill_disback_t700.json``.

Several training seeds of one variant: ``benchmarks/distill_disback_seeds.py`` applies :func:`compare` to the seed-mean
curves of these per-seed records.

(The earlier record, GAN weight 3e-3 and DM t in [20, 980] for both runs, base "rkl, earlier recipe", is kept as
benchmarks/results/distill_disback_earlier_recipe.json.)
"""
from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill import evaluations, read_run, split_label  # noqa: E402  (the one reader of run evaluations)

from fastgen.benchmarking import parse_options, portable, pyplot, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class DisBackBenchmark:
    """DisBack vs its base method: FID against generator updates."""

    disback: str = field(default="", metadata={
        "help": "the DisBack run folder (fastgen distill --method disback); LABEL=folder names it in the record"})
    base: str = field(default="record:" + str(RESULTS / "distill.json") + ":rkl (DMD2)", metadata={
        "help": "the base run folder, or record:<results json>:<label> (evaluations of an earlier record); "
                "LABEL=source names it in the record"})
    out: str = field(default=str(RESULTS / "distill_disback.json"), metadata={"help": "results JSON (PNG beside it)"})
    note: str = field(default="", metadata={"help": "free text kept in the record (e.g. how the run was evaluated)"})


def recording_steps(folder: str | os.PathLike) -> tuple[int, dict]:
    """``nodes * record_interval`` of a DisBack run (from its newest checkpoint's config) and its options."""
    from fastgen.training import run_summary

    config = run_summary(folder)["config"]
    if not config:
        raise ValueError(f"disback: {str(folder)!r} holds no checkpoint (its config names the recording stage).")
    options = config.get("method_options") or {}
    options = json.loads(options) if isinstance(options, str) else options
    from fastgen.training.disback import DisBackConfig

    defaults = DisBackConfig(output_dir=".")
    nodes = int(options.get("nodes", defaults.nodes))
    record = int(options.get("record_interval", defaults.record_interval))
    return nodes * record, {"nodes": nodes, "record_interval": record,
                            "interval": int(options.get("interval", defaults.interval)),
                            "base_method": options.get("base_method", defaults.base_method),
                            "num_validation_samples": config.get("num_validation_samples")}


def compare(disback: list[dict], base: list[dict]) -> dict:
    """The target's two parts: updates DisBack needs to reach the base's final FID (fraction of the base's
    updates), and DisBack's FID at the base's final update count (``None``: the DisBack run stopped earlier, not
    measured). CPU minutes count DisBack's recording stage (its updates do not)."""
    final = base[-1]
    hit = next((r for r in disback if r["updates"] >= 0 and r["fid"] is not None and r["fid"] <= final["fid"]), None)
    end = next((r for r in disback if r["updates"] == final["updates"]), None)
    recording = next((r for r in disback if r["updates"] == 0), None)
    fraction = None if hit is None else round(hit["updates"] / final["updates"], 3)
    summary = {"base_final_updates": final["updates"], "base_final_fid": final["fid"],
               "base_cpu_minutes": final.get("cpu_minutes"),
               "disback_updates_to_base_final_fid": None if hit is None else hit["updates"],
               "fraction_of_base_updates": fraction,
               "disback_cpu_minutes_to_base_final_fid": None if hit is None else hit.get("cpu_minutes"),
               "recording_cpu_minutes": None if recording is None else recording.get("cpu_minutes"),
               "disback_last_updates": disback[-1]["updates"] if disback else None,
               "disback_fid_at_base_final_updates": None if end is None else end["fid"]}
    last = disback[-1]["updates"] if disback else 0
    gap = disback[-1]["updates"] - disback[-2]["updates"] if len(disback) > 1 else 0
    # not reached by the last evaluation, and the next one on the run's grid lies beyond 70%: missed
    speed = (fraction <= 0.7) if fraction is not None else (False if last + gap > 0.7 * final["updates"] else None)
    ends = None if end is None else bool(end["fid"] <= final["fid"])
    summary.update(reaches_within_70_percent=speed, ends_no_worse=ends,
                   target_met=False if False in (speed, ends) else (True if speed and ends else None))
    return summary


def main(argv=None) -> None:
    opts = parse_options(DisBackBenchmark, argv)
    disback_label, folder = split_label(opts.disback)
    if not folder or not Path(folder, "train_log.jsonl").is_file():
        raise ValueError(f"disback: pass a DisBack run folder with a train_log.jsonl, got {opts.disback!r}.")
    shift, disback_options = recording_steps(folder)
    disback = [{**r, "updates": r["step"] - shift} for r in read_run(folder)]
    base_name, base = evaluations(opts.base)
    base = [{**r, "updates": r["step"]} for r in base]
    summary = compare(disback, base)
    record = {"config": {**asdict(opts), "disback": disback_label or Path(folder).name, "base": base_name,
                         "out": portable(opts.out), **disback_options, "recording_steps": shift},
              "hardware": f"{platform.machine()} CPU, {os.cpu_count()} cores, 1 torch thread, shared with other jobs",
              "summary": summary, "disback": disback, "base": base}
    out = write_json(opts.out, record)
    plot(record, out.with_suffix(".png"))
    print(json.dumps(summary, indent=1))


def plot(record: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(1, 1, figsize=(6.5, 4))
    cfg = record["config"]
    summary = record["summary"]
    disback, base = record["disback"], record["base"]
    ax.plot([r["updates"] for r in disback], [r["fid"] for r in disback], marker="o", color="tab:blue",
            label=f"DisBack over {cfg['base_method']} (after {cfg['recording_steps']} recording steps)")
    ax.plot([r["updates"] for r in base], [r["fid"] for r in base], marker="o", color="tab:orange",
            label=f"base: {cfg['base']}")
    start = next((r for r in disback if r["updates"] == 0), None)
    if start is not None and base and base[0]["updates"] > 0:  # both start from the same initial student
        ax.plot([0, base[0]["updates"]], [start["fid"], base[0]["fid"]], ls="--", color="tab:orange", lw=1)
    ax.axhline(summary["base_final_fid"], ls="--", color="grey", lw=0.8)
    ax.axvline(0.7 * summary["base_final_updates"], ls=":", color="tab:red", lw=0.8)
    ax.text(0.7 * summary["base_final_updates"], ax.get_ylim()[1], " 70% of the base's\n updates", fontsize=7,
            color="tab:red", va="top")
    ax.axvline(0, ls=":", color="grey", lw=1)
    ax.text(0, summary["base_final_fid"], " base's final FID", fontsize=7, va="bottom", color="grey")
    ax.set(xlabel="generator updates", ylabel=f"digits FID (n = {cfg['num_validation_samples']} fixed seeds)", yscale="log",
           title=f"DisBack ({cfg['nodes']} node{'s' if cfg['nodes'] != 1 else ''}, {cfg['interval']} updates each) vs base, same initial student",
           xlim=(-10, None))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
