"""AGD on the built-in digits model: one-evaluation-per-step adapters vs real CFG, same seeds, side by side.

Adapter guidance distillation (Jensen & Sadat, arXiv:2503.07274). Pipeline of this script (each stage is
skipped when its output exists, so an interrupted run continues):

1. CFG trajectories of the digits base (``fastgen distill collect-trajectories``), omega ~ U[1, 8];
2. two adapters with the same budget: AGD on the trajectories, and the classic baseline (guidance distillation
   on forward-noised real digits, Meng et al. 2023) (``fastgen distill --config distill/digits-agd.yaml``);
3. at each omega: CFG (2 NFE per step) vs the trajectory adapter vs the forward-noised adapter (1 NFE per step),
   same seeds (sample i: seed i, digit i % 10), same solver and steps: digits FID, class accuracy, NFE and
   wall seconds per image (measured in this process, one after the other).

Writes benchmarks/results/agd.json and agd.png::

    python benchmarks/agd.py --n 500 --train-steps 1500 --work runs/agd-bench
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastgen.benchmarking import builtin_pipeline, parse_options, portable, pyplot, write_json

RESULTS = Path(__file__).resolve().parent / "results"
RECIPE = Path(__file__).resolve().parent.parent / "distill" / "digits-agd.yaml"
KEYS = ("fid", "accuracy", "nfe", "seconds_per_image", "roughness")


@dataclass
class AGDBenchmark:
    """AGD vs CFG on the digits model."""

    n: int = field(default=500, metadata={"help": "samples per cell (fixed seeds 0..n-1)"})
    steps: int = field(default=20, metadata={"help": "solver steps per sample"})
    scales: list[float] = field(default_factory=lambda: [1.5, 3.0, 5.0, 8.0], metadata={"help": "guidance scales"})
    num_trajectories: int = field(default=1000, metadata={"help": "CFG trajectories collected for AGD"})
    train_steps: int = field(default=1500, metadata={"help": "adapter training steps (both adapters)"})
    work: str = field(default="runs/agd-bench", metadata={"help": "folder of the trajectory store and the two runs"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})
    out: str = field(default=str(RESULTS / "agd.json"), metadata={"help": "results JSON (PNG beside it)"})


def collect(opts: AGDBenchmark) -> Path:
    from fastgen.training.agd import collect_trajectories

    folder = Path(opts.work) / "trajectories"
    collect_trajectories("builtin:digits", folder, num_trajectories=opts.num_trajectories,
                         num_inference_steps=opts.steps, omega_range=(1.0, 8.0), batch_size=250, progress=False)
    return folder


def train(opts: AGDBenchmark, source: str, store: Path) -> tuple[Path, float]:
    """Train one adapter with the recipe (resumed when interrupted); returns its run folder and wall minutes."""
    from fastgen.cli.command import read_recipe
    from fastgen.training import DistillConfig, run_distillation

    folder = Path(opts.work) / f"run-{source}"
    if (folder / "student" / "config.json").is_file():
        return folder, float(json.loads((folder / "bench_minutes.json").read_text())["minutes"])
    recipe = read_recipe(RECIPE, DistillConfig)
    options = dict(recipe.get("method_options") or {})
    options.update(source=source, trajectories=str(store) if source == "trajectories" else None)
    recipe.update(method_options=options, output_dir=str(folder), max_train_steps=opts.train_steps,
                  lr_warmup_steps=max(1, opts.train_steps // 10), resume_from_checkpoint="latest",
                  validation_steps=0, progress=False, report_to="none")
    if source == "forward_noised":
        recipe["dataset"] = "builtin:digits"
    t0 = time.perf_counter()
    run_distillation(DistillConfig(**recipe))
    minutes = (time.perf_counter() - t0) / 60
    (folder / "bench_minutes.json").write_text(json.dumps({"minutes": minutes}))
    return folder, minutes


def evaluate(opts: AGDBenchmark, adapters: dict[str, Path]) -> list[dict]:
    from fastgen.metrics import evaluate_pipeline

    pipe = builtin_pipeline("digits", threads=opts.threads)
    rows = []
    for scale in opts.scales:
        for label, folder in [("cfg", None), *adapters.items()]:
            if folder is None:
                pipe.unload_guidance_adapter()
            else:
                pipe.load_guidance_adapter(folder)
            res = evaluate_pipeline(pipe, opts.n, seed=0, progress=False, num_inference_steps=opts.steps,
                                    guidance_scale=scale).to_dict()
            rows.append({"method": label, "guidance_scale": scale, **{k: res.get(k) for k in KEYS}})
            print(rows[-1], flush=True)
    pipe.unload_guidance_adapter()
    return rows


def main(argv=None) -> None:
    opts = parse_options(AGDBenchmark, argv)
    t0 = time.perf_counter()
    store = collect(opts)
    collect_minutes = (time.perf_counter() - t0) / 60
    agd, agd_minutes = train(opts, "trajectories", store)
    fn, fn_minutes = train(opts, "forward_noised", store)
    rows = evaluate(opts, {"agd": agd / "student", "forward_noised": fn / "student"})
    summary = []
    for scale in opts.scales:
        cell = {r["method"]: r for r in rows if r["guidance_scale"] == scale}
        summary.append({"guidance_scale": scale,
                        "fid_ratio_agd_over_cfg": cell["agd"]["fid"] / cell["cfg"]["fid"],
                        "time_ratio_agd_over_cfg": cell["agd"]["seconds_per_image"] / cell["cfg"]["seconds_per_image"],
                        "nfe_agd": cell["agd"]["nfe"], "nfe_cfg": cell["cfg"]["nfe"],
                        "fid_trajectory_minus_forward_noised": cell["agd"]["fid"] - cell["forward_noised"]["fid"]})
    record = {"config": {**asdict(opts), "out": portable(opts.out), "work": portable(opts.work)},
              "hardware": f"{platform.machine()} CPU, {os.cpu_count()} cores, {opts.threads} torch thread(s), shared "
                          f"with other jobs (wall times are noisy; cells of one omega run back to back)",
              "minutes": {"collect": round(collect_minutes, 2), "train_agd": round(agd_minutes, 2),
                          "train_forward_noised": round(fn_minutes, 2)},
              "rows": rows, "summary": summary}
    out = write_json(opts.out, record)
    plot(record, out.with_suffix(".png"))


def plot(record: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    labels = {"cfg": "CFG (2 NFE/step)", "agd": "AGD trajectories (1 NFE/step)",
              "forward_noised": "forward-noised adapter (1 NFE/step)"}
    for method, label in labels.items():
        rows = [r for r in record["rows"] if r["method"] == method]
        scales = [r["guidance_scale"] for r in rows]
        axes[0].plot(scales, [r["fid"] for r in rows], marker="o", label=label)
        axes[1].plot(scales, [r["accuracy"] for r in rows], marker="o", label=label)
        axes[2].plot(scales, [1000 * r["seconds_per_image"] for r in rows], marker="o", label=label)
    axes[0].set(xlabel="guidance scale omega", ylabel="digits FID", title="FID (lower is better)")
    axes[1].set(xlabel="guidance scale omega", ylabel="class accuracy", title="accuracy")
    axes[2].set(xlabel="guidance scale omega", ylabel="ms per image", title="wall time per image")
    for ax in axes:
        ax.legend(fontsize=7)
    cfg = record["config"]
    fig.suptitle(f"AGD vs CFG on the digits model (n = {cfg['n']} fixed seeds, {cfg['steps']} steps, adapters "
                 f"trained {cfg['train_steps']} steps)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
