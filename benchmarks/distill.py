"""Students of the built-in digits teacher against the teacher itself: FID, grain and recall vs generator steps.

Collects the in-training evaluations of ``fastgen distill`` runs (their ``train_log.jsonl``: FID, class
accuracy, roughness, precision/recall of the EMA student on the run's fixed seeds, sample i: seed i, digit
i % 10) and scores the teacher on the same seeds and sample count with the same evaluator: 20 CFG steps
(40 NFE), the shortest shipped S³ schedule (4 steps, 8 NFE) and DPM-Solver++ at 2 and 1 steps (4 and 2 NFE). Writes
benchmarks/results/distill.json and .png (FID and roughness against generator steps and wall minutes; with
``--headline`` the PNG shows those runs and distill_all.png every run).

    fastgen distill --config distill/digits-fdistill-js.yaml --output-dir runs/js
    fastgen distill --config distill/digits-fdistill-js.yaml --divergence rkl --output-dir runs/rkl
    python benchmarks/distill.py --runs js=runs/js rkl=runs/rkl --n 500
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastgen.benchmarking import builtin_pipeline, curve_colour, parse_options, portable, pyplot, write_json

RESULTS = Path(__file__).resolve().parent / "results"
SCHEDULES = Path(__file__).resolve().parent.parent / "fastgen" / "assets" / "digits-schedules"
KEYS = ("fid", "accuracy", "roughness", "precision", "recall")


@dataclass
class DistillBenchmark:
    """One-step students of the digits teacher vs the teacher: FID against generator steps."""

    runs: list[str] = field(default_factory=list, metadata={
        "help": "label=run_folder pairs of fastgen distill runs; label=A+B joins a run and its resumed continuation"})
    n: int = field(default=500, metadata={"help": "samples of the teacher cells (use the runs' num_validation_samples)"})
    teacher_scale: float = field(default=2.0, metadata={"help": "teacher CFG scale (the recipes' guidance_scale)"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})
    out: str = field(default=str(RESULTS / "distill.json"), metadata={"help": "results JSON (PNG beside it)"})
    fresh: bool = field(default=False, metadata={"help": "re-score the teacher even if --out has its cells for the "
                                                         "same n and scale"})
    keep: bool = field(default=False, metadata={
        "help": "keep the students (and their held-out cells) already in --out, adding or replacing --runs: "
                "earlier runs whose folders are gone stay in the record"})
    headline: list[str] = field(default_factory=list, metadata={
        "help": "labels of the runs the main figure shows (the rest go to <out>_all.png with them); default: the "
                "kept record's headline with --keep, else every run"})
    heldout: bool = field(default=True, metadata={
        "help": "also score the 40-NFE teacher and each run's exported student against the held-out digits "
                "(297 images neither the teacher nor the GAN term saw), on the same seeds"})


def read_run(folder: str | os.PathLike) -> list[dict]:
    """The evaluation records of a run (FID, accuracy, roughness, precision/recall, wall and CPU minutes)."""
    from fastgen.training.trainer import read_run_log

    return read_run_log(folder, KEYS)


def split_label(spec: str) -> tuple[str | None, str]:
    """``("LABEL", "source")`` of ``LABEL=source``; ``(None, spec)`` when the spec names no label."""
    label, sep, source = spec.partition("=")
    return (label.strip(), source) if sep and label.strip() else (None, spec)


_JOIN = re.compile(r"(?<! )\+(?! )")  # A+B; not the " + " of a label such as "regression + DM"


def evaluations(spec: str) -> tuple[str, list[dict]]:
    """``(name, evaluation records)`` of a run folder, or of ``record:<results json>:<label>``: a run kept in an
    earlier record (``students`` of distill.json, ``runs`` of distill_msd.json, ``disback`` / ``base`` of a
    distill_disback record). ``A+B`` joins sources in step
    order, e.g. a kept record and the folder of its resumed continuation (a later source wins a shared step); the
    joining ``+`` has no space beside it, so a record label may hold " + ".
    ``LABEL=source`` names the source ``LABEL`` in the record (default: the folder's name or the record's label)."""
    label, source = split_label(spec)
    if label:
        return label, evaluations(source)[1]
    parts = _JOIN.split(spec)
    if len(parts) > 1:
        joined = [evaluations(part) for part in parts]
        rows: dict[int, dict] = {}
        for _, part in joined:
            rows.update({row["step"]: row for row in _continue_minutes(part, [rows[k] for k in sorted(rows)])})
        return "+".join(name for name, _ in joined), [rows[k] for k in sorted(rows)]
    if spec.startswith("record:"):
        path, sep, label = spec[len("record:"):].partition(".json:")  # a label may hold ':' (builtin:...)
        path += ".json" if sep else ""
        record = json.loads(Path(path).read_text())
        runs = {**record.get("runs", {}), **record.get("students", {}),
                **{k: {"evaluations": record[k]} for k in ("disback", "base") if isinstance(record.get(k), list)}}
        if label not in runs:
            raise ValueError(f"{spec!r}: {Path(path).name} holds no run {label!r}; it holds {sorted(runs)}.")
        return f"{Path(path).name}:{label}", runs[label]["evaluations"]
    if not Path(spec, "train_log.jsonl").is_file():
        raise ValueError(f"{spec!r} is neither a run folder with a train_log.jsonl nor record:<json>:<label>.")
    return Path(spec).name, read_run(spec)


def _continue_minutes(part: list[dict], before: list[dict]) -> list[dict]:
    """``part``'s rows with their minutes counted on from ``before``'s: a run warm-started from another folder's
    checkpoint logs its minutes from zero; they continue from the earlier source's last evaluation before the
    continuation's first (a resume in the same folder already counts on, and is left as it is)."""
    if not part or not before:
        return part
    first = min(part, key=lambda r: r["step"])
    earlier = [r for r in before if r["step"] < first["step"]]
    if not earlier:
        return part
    base = earlier[-1]
    out = [dict(r) for r in part]
    for key in ("wall_minutes", "cpu_minutes"):
        if base.get(key) is None or first.get(key) is None or first[key] >= base[key]:
            continue  # nothing to add to, or already counted on
        for r in out:
            if r.get(key) is not None:
                r[key] = round(r[key] + base[key], 2)
    return out


def best(rows: list[dict]) -> dict:
    """The evaluation with the lowest FID (the figure a run reaches, and the minutes it took)."""
    return min(rows, key=lambda r: r["fid"])


def teacher_cells(n: int, scale: float, threads: int) -> list[dict]:
    from fastgen.metrics import evaluate_pipeline

    pipe = builtin_pipeline("digits", threads=threads)
    cells = [("20 steps CFG", dict(num_inference_steps=20)),  # 40 NFE
             ("S³ 4 steps", dict(num_inference_steps=4, solver=str(SCHEDULES / "nfe4.json"))),  # 8 NFE (shortest shipped)
             ("DPM-Solver++ 2 steps", dict(num_inference_steps=2, solver="dpmsolver++")),  # 4 NFE
             ("DPM-Solver++ 1 step", dict(num_inference_steps=1, solver="dpmsolver++"))]  # 2 NFE
    out = []
    for name, kwargs in cells:
        res = evaluate_pipeline(pipe, n, seed=0, progress=False, guidance_scale=scale, **kwargs).to_dict()
        out.append({"teacher": name, "guidance_scale": scale, "nfe": res["nfe"], **{k: res.get(k) for k in KEYS}})
        print(out[-1], flush=True)
    return out


def _previous(opts: DistillBenchmark) -> dict:
    """The record at ``--out`` when it was scored with the same sample count and teacher scale (its teacher
    cells are reused), else ``{}``."""
    old = Path(opts.out)
    if old.is_file() and not opts.fresh:
        record = json.loads(old.read_text())
        if (record["config"]["n"], record["config"]["teacher_scale"]) == (opts.n, opts.teacher_scale):
            return record
    return {}


def _teacher(opts: DistillBenchmark) -> list[dict]:
    """The teacher cells, reused from ``--out`` when it scored the same n and scale."""
    return _previous(opts).get("teacher") or teacher_cells(opts.n, opts.teacher_scale, opts.threads)


HELDOUT = "builtin:digits:heldout"


def heldout_cells(opts: DistillBenchmark, runs: dict[str, str]) -> dict[str, dict]:
    """FID against the held-out split: the GAN term trains on the split the main FID's reference comes from,
    so a student could beat its teacher there by copying those images; this is the check that it does not."""
    from fastgen.builtin import load_pipeline  # a student or routed students (MSD), by the folder's class
    from fastgen.metrics import evaluate_pipeline

    cached = _previous(opts).get("heldout", {}).get("models", {})
    out = {label: cell for label, cell in cached.items() if opts.keep and label not in runs}
    teacher = "teacher, 20 steps CFG"
    if teacher in cached:
        out[teacher] = cached[teacher]
    else:
        pipe = builtin_pipeline("digits", threads=opts.threads)
        res = evaluate_pipeline(pipe, opts.n, seed=0, progress=False, reference=HELDOUT, num_inference_steps=20,
                                guidance_scale=opts.teacher_scale)
        out[teacher] = {"nfe": res.nfe, **{k: getattr(res, k) for k in KEYS}}
    for label, folder in runs.items():
        student = Path(folder, "student")
        if not (student / "model_index.json").is_file():
            continue
        res = evaluate_pipeline(load_pipeline(str(student)), opts.n, seed=0, progress=False, reference=HELDOUT)
        out[label] = {"nfe": res.nfe, **{k: getattr(res, k) for k in KEYS}}
        print(label, out[label], flush=True)
    return {"reference": HELDOUT, "note": "the exported (final EMA) student of each run", "models": out}


def main(argv=None) -> None:
    opts = parse_options(DistillBenchmark, argv)
    previous = _previous(opts) if opts.keep else {}
    if opts.keep and not previous:
        raise ValueError(f"--keep: {opts.out} holds no record of n={opts.n}, teacher_scale={opts.teacher_scale}.")
    runs = dict(previous.get("students", {}))
    folders = {}
    for spec in opts.runs:
        label, sep, source = spec.partition("=")
        if not sep:
            raise ValueError(f"runs entries must be label=source (a run folder, or A+B), got {spec!r}.")
        name, rows = evaluations(source)
        last = source.split("+")[-1]  # the folder whose exported student is the run's final one
        if not last.startswith("record:"):
            folders[label] = last
        runs[label] = {"run": name, "best": best(rows) if rows else None,
                       "evaluations": rows}  # no machine path in results
    headline = opts.headline or previous.get("config", {}).get("headline", [])
    missing = [label for label in headline if label not in runs]
    if missing:
        raise ValueError(f"--headline names runs that are not in the record: {missing}; its runs: {list(runs)}.")
    config = {**asdict(opts), "out": portable(opts.out), "headline": headline,
              "runs": [f"{label}={Path(run['run']).name}" for label, run in runs.items()]}
    record = {"config": config, "hardware": f"{platform.machine()} CPU, {os.cpu_count()} cores, 1 torch thread "
              "per job, shared with other jobs (wall minutes are noisy)",
              "teacher": _teacher(opts), "students": runs}
    if opts.heldout:
        record["heldout"] = heldout_cells(opts, folders)
    out = write_json(opts.out, record)
    plot(record, out.with_suffix(".png"), headline)
    if headline:
        plot(record, out.with_name(f"{out.stem}_all.png"))


def plot(record: dict, path: Path, runs: list[str] | None = None) -> None:
    """FID (vs steps and vs minutes), grain and recall of the students ``runs`` (labels; default: all) in one
    figure."""
    plt = pyplot()
    students = {label: record["students"][label] for label in (runs or record["students"])}
    fig, axes = plt.subplots(1, 4, figsize=(19, 6.2))
    minutes = "cpu_minutes" if all(r.get("cpu_minutes") is not None for run in students.values()
                                   for r in run["evaluations"]) else "wall_minutes"
    for i, (label, run) in enumerate(students.items()):
        rows = run["evaluations"]
        style = dict(marker="o" if i < 20 else "s", ms=3, color=curve_colour(plt, i, len(students)),  # past 20: squares
                     ls="--" if "earlier" in label else "-")
        for ax, x, y in ((axes[0], "step", "fid"), (axes[1], minutes, "fid"), (axes[2], "step", "roughness"),
                         (axes[3], "step", "recall")):
            ax.plot([r[x] for r in rows], [r[y] for r in rows], label=f"student {label}", **style)
    for cell in record["teacher"]:
        for ax, key in ((axes[0], "fid"), (axes[1], "fid"), (axes[2], "roughness"), (axes[3], "recall")):
            ax.axhline(cell[key], ls="--", lw=1, color="grey" if "20 steps" in cell["teacher"] else "tab:red")
            ax.text(ax.get_xlim()[1], cell[key], f" teacher {cell['teacher']} ({cell['nfe']:g} NFE)", fontsize=6,
                    va="bottom", ha="right")
    axes[0].set(xlabel="generator steps", ylabel="digits FID", yscale="log", title="FID vs generator steps")
    axes[1].set(xlabel=minutes.replace("_", " ") + " of training (1 thread)", ylabel="digits FID", yscale="log",
                title="FID vs time")
    axes[2].set(xlabel="generator steps", ylabel="roughness (mean |neighbour diff|)", title="grain",
                ylim=(0.085, 0.12))  # the 1-step solver's 0.26 would flatten every student's curve
    axes[3].set(xlabel="generator steps", ylabel="recall", title="mode coverage")
    handles, labels = axes[0].get_legend_handles_labels()  # one legend for the four panels, below them
    ncol = 4 if len(students) > 12 else 2
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=7 if ncol == 4 else 8, frameon=False)
    shown = "" if len(students) == len(record["students"]) else f", {len(students)} of {len(record['students'])} runs"
    fig.suptitle(f"Students of the digits teacher (n = {record['config']['n']} fixed seeds{shown})", fontsize=9)
    legend_rows = math.ceil(len(students) / ncol)
    fig.subplots_adjust(left=0.04, right=0.99, top=0.9, bottom=0.34 if ncol == 4 else 0.12 + 0.025 * legend_rows,
                        wspace=0.25)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
