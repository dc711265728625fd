"""AGD on the built-in digits model: one-evaluation-per-step adapters vs real CFG, same seeds, side by side.

Adapter guidance distillation (Jensen & Sadat, arXiv:2503.07274; spec distillation.md §5). Stages (each one
resumes: the store, the runs and every measured cell are kept, so an interrupted run continues):

1. CFG trajectories of the digits base (``fastgen distill collect-trajectories``), omega ~ U[1, omega_max];
2. two adapters with the same budget: AGD on the trajectories, and the classic baseline (guidance distillation
   on forward-noised real digits, Meng et al. 2023, arXiv:2210.03142) (recipe ``distill/digits-agd.yaml``);
3. quality cells, in priority order: at each omega CFG (2 NFE per step) vs the trajectory adapter (1 NFE per
   step), the forward-noised adapter at ``fn_scales``, then the compositions: the shipped S³ schedules
   (``fastgen/assets/digits-schedules``) with CFG and with AGD, and guidance dropped for the last steps
   (``CFG(stop=late_stop)``: adapter off, i.e. CFG at 1, after that fraction of the steps; Adaptive
   Guidance's observation, Castillo et al. 2023). Same seeds (sample i: seed i, digit i % 10): digits FID,
   class accuracy, precision/recall, NFE, and the RMS pixel distance to the 20-step CFG images of the same
   seeds at the same omega (FID on digits *improves* as guidance weakens, so a one-pass model that guides
   less than CFG would pass a FID-only test: accuracy and this distance say whether it reproduces CFG);
4. wall time per image of CFG, AGD, AGD with late drop and no guidance at ``time_scale``: interleaved repeats
   in one process, median, at each ``time_batches`` size (measured after the 20-step cells, before the
   compositions, which use ``n_compose`` samples).

Writes benchmarks/results/agd.json and agd.png::

    python benchmarks/agd.py --n 2000 --train_steps 1500 --work runs/agd-bench
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fastgen.benchmarking import Results, builtin_pipeline, parse_options, portable, pyplot

RESULTS = Path(__file__).resolve().parent / "results"
RECIPE = Path(__file__).resolve().parent.parent / "distill" / "digits-agd.yaml"
KEYS = ("fid", "accuracy", "precision", "recall", "nfe", "seconds_per_image", "rms_to_reference")
LABELS = {"cfg": "CFG (2 NFE/step)", "agd": "AGD, trajectories (1 NFE/step)",
          "forward_noised": "adapter, forward-noised data (1 NFE/step)", "none": "no guidance (1 NFE/step)"}


@dataclass
class AGDBenchmark:
    """AGD vs CFG on the digits model."""

    n: int = field(default=2000, metadata={"help": "samples per cell (fixed seeds 0..n-1)"})
    n_compose: int = field(default=1000, metadata={"help": "samples per composition cell (S³, late drop): seeds 0.."})
    steps: int = field(default=20, metadata={"help": "solver steps per sample"})
    scales: list[float] = field(default_factory=lambda: [3.0, 5.0, 8.0, 1.5], metadata={"help": "guidance scales"})
    fn_scales: list[float] = field(default_factory=lambda: [5.0, 8.0],
                                   metadata={"help": "scales of the forward-noised adapter cells"})
    num_trajectories: int = field(default=1000, metadata={"help": "CFG trajectories collected for AGD"})
    omega_max: float = field(default=8.0, metadata={"help": "trajectories and baseline draw omega ~ U[1, omega_max]"})
    train_steps: int = field(default=1500, metadata={"help": "adapter training steps (both adapters)"})
    batch_size: int = field(default=64, metadata={"help": "training batch (rows)"})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate (10% warm-up, cosine)"})
    width: int = field(default=0, metadata={"help": "adapter width (0: GuidanceAdapter.for_model's default)"})
    variant: str = field(default="", metadata={"help": "adapter variant: additive / attention ('': the default)"})
    heads: int = field(default=0, metadata={"help": "attention heads of the attention variant (0: the default)"})
    s3: list[str] = field(default_factory=lambda: ["nfe5.json", "nfe10.json"],
                          metadata={"help": "S³ schedules of fastgen/assets/digits-schedules composed with AGD"})
    s3_scale: float = field(default=3.0, metadata={"help": "omega of the S³ cells (the schedules were searched at 3)"})
    late_stop: float = field(default=0.7, metadata={"help": "late drop: guidance on for this fraction of the steps"})
    late_scales: list[float] = field(default_factory=lambda: [3.0, 5.0], metadata={"help": "omegas of late-drop cells"})
    time_scale: float = field(default=3.0, metadata={"help": "omega of the wall-time measurement"})
    time_batches: list[int] = field(default_factory=lambda: [4, 100], metadata={"help": "wall-time batch sizes"})
    repeats: int = field(default=5, metadata={"help": "interleaved wall-time repeats (median); 0 skips timing"})
    work: str = field(default="runs/agd-bench", metadata={"help": "folder of the trajectory store, runs, CFG images"})
    only_train: bool = field(default=False, metadata={"help": "stop after collecting and training"})
    compose: bool = field(default=True, metadata={"help": "also measure the S³ and late-drop compositions"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})
    out: str = field(default=str(RESULTS / "agd.json"), metadata={"help": "results JSON (PNG beside it)"})


# ---------------------------------------------------------------------------------------------- stages 1-2
def collect(opts: AGDBenchmark) -> tuple[Path, float]:
    from fastgen.training.agd import collect_trajectories

    folder = Path(opts.work) / "trajectories"
    t0 = time.perf_counter()
    collect_trajectories("builtin:digits", folder, num_trajectories=opts.num_trajectories,
                         num_inference_steps=opts.steps, omega_range=(1.0, opts.omega_max), batch_size=250,
                         progress=False)
    return folder, time.perf_counter() - t0


def run_folder(opts: AGDBenchmark, source: str) -> Path:
    tag = "".join(f"-{k}{v}" for k, v in (("", opts.variant), ("w", opts.width), ("h", opts.heads)) if v)
    return Path(opts.work) / f"run-{source}{tag}"


def train(opts: AGDBenchmark, source: str, store: Path) -> dict:
    """Train one adapter with the recipe (resumed when interrupted); returns its run folder and CPU/wall minutes."""
    from fastgen.cli.command import read_recipe
    from fastgen.training import DistillConfig, run_distillation

    folder = run_folder(opts, source)
    done = folder / "bench_minutes.json"
    if (folder / "student" / "config.json").is_file() and done.is_file():
        record = json.loads(done.read_text())
        if "fit" not in record:
            record["fit"] = fit_quality(opts, source, store)
            done.write_text(json.dumps(record))
        return record
    recipe = read_recipe(RECIPE, DistillConfig)
    options = dict(recipe.get("method_options") or {})
    options.update(source=source, trajectories=str(store) if source == "trajectories" else None,
                   omega_range=[1.0, opts.omega_max])
    for name in ("width", "variant", "heads"):
        if getattr(opts, name):
            options[name] = getattr(opts, name)
    recipe.update(method_options=options, output_dir=str(folder), max_train_steps=opts.train_steps,
                  train_batch_size=opts.batch_size, learning_rate=opts.learning_rate,
                  lr_warmup_steps=max(1, opts.train_steps // 10), resume_from_checkpoint="latest",
                  validation_steps=0, progress=False, report_to="none")
    if source == "forward_noised":
        recipe["dataset"] = "builtin:digits"
    t0, c0 = time.perf_counter(), time.process_time()
    run_distillation(DistillConfig(**recipe))
    record = {"source": source, "folder": portable(folder), "wall_minutes": (time.perf_counter() - t0) / 60,
              "cpu_minutes": (time.process_time() - c0) / 60, "train_steps": opts.train_steps,
              "batch_size": opts.batch_size, "learning_rate": opts.learning_rate}
    record["fit"] = fit_quality(opts, source, store)
    done.write_text(json.dumps(record))
    return record


def fit_quality(opts: AGDBenchmark, source: str, store: Path, rows: int = 1024) -> dict:
    """MSE to the stored CFG targets on ``rows`` fixed store rows (training rows: a diagnostic, not a test):
    with the adapter off (the whole CFG correction, ``(w - 1)^2 |c - u|^2``) and on, per omega third."""
    import numpy as np

    import fastgen
    from fastgen.adapters import load_guidance_adapter
    from fastgen.denoiser import Denoiser
    from fastgen.training.agd import TrajectoryStore

    st = TrajectoryStore(store)
    pick = np.random.default_rng(0).choice(st.num_trajectories * st.num_steps, rows, replace=False)
    r = st.rows(np.sort(pick))
    pipe = fastgen.load_builtin("digits")
    den = Denoiser.from_scheduler(pipe.unet, pipe.scheduler)
    adapter = load_guidance_adapter(run_folder(opts, source) / "student").attach(pipe.unet)
    errs = {}
    with torch.no_grad():
        for label, on in (("adapter_off", False), ("adapter_on", True)):
            adapter.enabled = on
            out = []
            for i in range(0, rows, 256):
                with adapter.guidance_scale(r["omega"][i:i + 256]):
                    out.append(den(r["x_t"][i:i + 256].float(), r["t"][i:i + 256],
                                   {"class_labels": r["cond"]["class_labels"][i:i + 256]}))
            errs[label] = ((torch.cat(out).float() - r["target"].float()) ** 2).flatten(1).mean(1)
    adapter.detach()
    record = {"rows": rows, "mse_adapter_off": errs["adapter_off"].mean().item(),
              "mse_adapter_on": errs["adapter_on"].mean().item()}
    record["share_of_cfg_correction_left"] = record["mse_adapter_on"] / record["mse_adapter_off"]
    edges = np.linspace(1.0, opts.omega_max, 4)
    omega = r["omega"].numpy()
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = torch.from_numpy((omega >= lo) & (omega <= hi))
        record[f"share_left_omega_{lo:.1f}_{hi:.1f}"] = (errs["adapter_on"][m].mean() / errs["adapter_off"][m].mean()).item()
    return record


# ---------------------------------------------------------------------------------------------- stage 3
def cells(opts: AGDBenchmark) -> list[dict]:
    """Quality cells in priority order (most important first; an interrupted run keeps what it measured)."""
    out = []
    for w in opts.scales:
        out.append({"method": "cfg", "guidance_scale": w, "variant": "20 steps"})
        out.append({"method": "agd", "guidance_scale": w, "variant": "20 steps"})
        if w in opts.fn_scales:
            out.append({"method": "forward_noised", "guidance_scale": w, "variant": "20 steps"})
    out.append({"method": "none", "guidance_scale": 1.0, "variant": "20 steps"})  # the unguided model: scale of RMS
    for w in opts.late_scales:
        for method in ("agd", "cfg"):
            out.append({"method": method, "guidance_scale": w, "variant": f"late drop (stop {opts.late_stop})"})
    for name in opts.s3:
        for method in ("agd", "cfg"):
            out.append({"method": method, "guidance_scale": opts.s3_scale, "variant": f"S3 {name}"})
    for cell in out:
        cell["n"] = opts.n if cell["variant"] == "20 steps" else min(opts.n, opts.n_compose)
    return out


def call_kwargs(opts: AGDBenchmark, cell: dict) -> dict:
    from fastgen.builtin import asset_path
    from fastgen.guidance import CFG

    w, variant = cell["guidance_scale"], cell["variant"]
    if variant.startswith("late drop"):
        return {"num_inference_steps": opts.steps, "guidance": CFG(guidance_scale=w, stop=opts.late_stop),
                "guidance_scale": w}
    if variant.startswith("S3 "):
        schedule = asset_path(f"digits-schedules/{variant[3:]}")
        nfe = int(json.loads(schedule.read_text()).get("nfe") or variant[3:].removeprefix("nfe").split(".")[0])
        return {"num_inference_steps": nfe, "solver": str(schedule), "guidance_scale": w}
    return {"num_inference_steps": opts.steps, "guidance_scale": w}


def set_method(pipe, opts: AGDBenchmark, method: str) -> None:
    if method in ("cfg", "none"):
        pipe.unload_guidance_adapter()
    else:
        pipe.load_guidance_adapter(run_folder(opts, "trajectories" if method == "agd" else method) / "student")


def cfg_images(pipe, opts: AGDBenchmark, w: float) -> torch.Tensor | None:
    path = Path(opts.work) / "cfg_images" / f"w{w:g}_n{opts.n}_s{opts.steps}.pt"
    return torch.load(path, weights_only=True) if path.is_file() else None


def measure(pipe, opts: AGDBenchmark, cell: dict) -> dict:
    from fastgen.metrics import evaluate_pipeline

    set_method(pipe, opts, cell["method"])
    w, n = cell["guidance_scale"], cell["n"]
    reference = cfg_images(pipe, opts, w)
    reference = None if reference is None else reference[:n].float()
    plain_cfg = cell["method"] == "cfg" and cell["variant"] == "20 steps"
    captured: list[torch.Tensor] = []
    keep = plain_cfg or cell["method"] == "none"
    on_batch = (lambda out, start, stop: captured.append(out.images.float().cpu())) if keep else None
    grid = None
    if w in (3.0, 8.0) and cell["variant"] == "20 steps" and cell["method"] in ("cfg", "agd"):
        grid = Path(opts.work) / "grids" / f"{cell['method']}_w{w:g}.png"
    t0 = time.process_time()
    res = evaluate_pipeline(pipe, n, seed=0, progress=False, on_batch=on_batch, grid=grid, grid_count=40,
                            grid_title=f"{LABELS[cell['method']]}, omega {w:g}",
                            reference_samples=None if keep else reference, **call_kwargs(opts, cell)).to_dict()
    if plain_cfg:
        path = Path(opts.work) / "cfg_images" / f"w{w:g}_n{opts.n}_s{opts.steps}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(torch.cat(captured).half(), path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)
        res["rms_to_reference"] = 0.0
    record = {k: res.get(k) for k in KEYS}
    if cell["method"] == "none":  # how far the unguided images are from CFG's at each omega (same seeds)
        images = torch.cat(captured)
        record["rms_to_cfg_images"] = {f"{v:g}": ((images - ref.float()) ** 2).mean().sqrt().item()
                                       for v in opts.scales if (ref := cfg_images(pipe, opts, v)) is not None}
    record["cpu_seconds"] = time.process_time() - t0
    if grid is not None:
        record["grid"] = portable(grid)
    return record


# ---------------------------------------------------------------------------------------------- stage 4
def wall_time(pipe, opts: AGDBenchmark) -> list[dict]:
    """Seconds per image at ``time_scale``: CFG, AGD, AGD with late drop, no guidance; interleaved, median."""
    from fastgen.guidance import CFG

    w = opts.time_scale
    configs = {"cfg": ("cfg", {"guidance_scale": w}),
               "agd": ("agd", {"guidance_scale": w}),
               "agd_late_drop": ("agd", {"guidance": CFG(guidance_scale=w, stop=opts.late_stop), "guidance_scale": w}),
               "none": ("cfg", {"guidance_scale": 1.0})}
    rows = []
    for batch in opts.time_batches:
        labels = [i % 10 for i in range(batch)]
        times: dict[str, list[float]] = {k: [] for k in configs}
        nfe = {}

        def call(name):
            method, kw = configs[name]
            set_method(pipe, opts, method)
            t0 = time.perf_counter()
            out = pipe(labels, num_inference_steps=opts.steps, seed=0, output_type="latent", **kw)
            return time.perf_counter() - t0, float(out.nfe)

        for name in configs:  # warm-up
            nfe[name] = call(name)[1]
        for _ in range(opts.repeats):
            for name in configs:
                times[name].append(call(name)[0] / batch)
        cfg = statistics.median(times["cfg"])
        for name in configs:
            med = statistics.median(times[name])
            rows.append({"config": name, "batch": batch, "guidance_scale": w, "nfe": nfe[name],
                         "seconds_per_image": med, "repeats": opts.repeats, "time_ratio_vs_cfg": med / cfg,
                         "nfe_ratio_vs_cfg": nfe[name] / nfe["cfg"]})
        print(f"wall time batch {batch}: " + ", ".join(f"{r['config']} {r['seconds_per_image'] * 1e3:.2f} ms"
                                                       for r in rows if r["batch"] == batch), flush=True)
    set_method(pipe, opts, "cfg")
    return rows


# ---------------------------------------------------------------------------------------------- summary, plot
def summarise(data: dict) -> None:
    rows = data["cells"]

    def find(method, w, variant="20 steps"):
        hits = [r for r in rows if r["method"] == method and r["guidance_scale"] == w and r["variant"] == variant]
        return hits[-1] if hits else None

    summary = []
    for w in sorted({r["guidance_scale"] for r in rows}):
        cfg, agd, fn = find("cfg", w), find("agd", w), find("forward_noised", w)
        if cfg is None or agd is None:
            continue
        entry = {"guidance_scale": w, "fid_cfg": cfg["fid"], "fid_agd": agd["fid"],
                 "fid_ratio_agd_over_cfg": agd["fid"] / cfg["fid"],
                 "fid_target_met (<= 1.03)": agd["fid"] / cfg["fid"] <= 1.03,
                 "accuracy_cfg": cfg["accuracy"], "accuracy_agd": agd["accuracy"],
                 "rms_agd_to_cfg_images": agd["rms_to_reference"], "nfe_cfg": cfg["nfe"], "nfe_agd": agd["nfe"]}
        none = find("none", 1.0)
        if none is not None and f"{w:g}" in (none.get("rms_to_cfg_images") or {}):
            entry["rms_unguided_to_cfg_images"] = none["rms_to_cfg_images"][f"{w:g}"]
            entry["share_of_cfg_shift_left_agd"] = agd["rms_to_reference"] / entry["rms_unguided_to_cfg_images"]
        if fn is not None:
            entry.update(fid_forward_noised=fn["fid"], accuracy_forward_noised=fn["accuracy"],
                         rms_forward_noised_to_cfg_images=fn["rms_to_reference"],
                         trajectory_closer_to_cfg_than_forward_noised=agd["rms_to_reference"] < fn["rms_to_reference"])
        summary.append(entry)
    data["summary"] = summary


def plot(data: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    main = [r for r in data["cells"] if r["variant"] == "20 steps"]
    for method, label in LABELS.items():
        rows = sorted((r for r in main if r["method"] == method), key=lambda r: r["guidance_scale"])
        if not rows:
            continue
        ws = [r["guidance_scale"] for r in rows]
        axes[0].plot(ws, [r["fid"] for r in rows], marker="o", label=label)
        axes[1].plot(ws, [r["accuracy"] for r in rows], marker="o", label=label)
        if method in ("agd", "forward_noised"):
            axes[2].plot(ws, [r["rms_to_reference"] for r in rows], marker="o", label=label)
    axes[0].set(xlabel="guidance scale omega", ylabel="digits FID", title="FID (lower is better)")
    axes[1].set(xlabel="guidance scale omega", ylabel="class accuracy", title="accuracy")
    axes[2].set(xlabel="guidance scale omega", ylabel="RMS pixel distance", title="distance to CFG images (same seeds)")
    ax = axes[3]
    for r in data["cells"]:
        marker = {"cfg": "s", "agd": "o", "forward_noised": "^", "none": "x"}[r["method"]]
        color = {"20 steps": "C0", "late": "C1", "S3 nfe5.json": "C2", "S3 nfe10.json": "C3"}.get(
            r["variant"] if not r["variant"].startswith("late") else "late", "C4")
        ax.scatter(r["nfe"], r["fid"], marker=marker, color=color, s=22)
        ax.annotate(f"{r['method'][:3]} {r['guidance_scale']:g}", (r["nfe"], r["fid"]), fontsize=5)
    ax.set(xlabel="NFE per image", ylabel="digits FID", title="all cells (blue 20 steps, orange late drop, "
                                                                "green/red S3 nfe5/10)")
    ax.title.set_fontsize(7)
    for a in axes[:3]:
        a.legend(fontsize=6)
    cfg = data["config"]
    fig.suptitle(f"AGD vs CFG on the digits model (n = {cfg['n']} fixed seeds, {cfg['steps']} steps, adapters "
                 f"trained {cfg['train_steps']} steps)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    opts = parse_options(AGDBenchmark, argv)
    torch.set_num_threads(opts.threads)
    store, collect_seconds = collect(opts)
    training = {"trajectories": train(opts, "trajectories", store)}
    if opts.only_train:
        if set(opts.fn_scales) & set(opts.scales):
            train(opts, "forward_noised", store)
        return
    config = {**asdict(opts), "out": portable(opts.out), "work": portable(opts.work)}
    results = Results(opts.out, config, resume_on=("n", "steps", "train_steps", "batch_size", "learning_rate",
                                                   "width", "variant", "heads", "num_trajectories",
                                                   "omega_max"))
    results.data.setdefault("training", {}).update(training)
    results.data.setdefault("collect_seconds", collect_seconds)
    results.data["hardware"] = (f"{platform.machine()} CPU, {os.cpu_count()} cores shared with other jobs, "
                                f"{opts.threads} torch thread(s), torch {torch.__version__}")
    pipe = builtin_pipeline("digits", threads=opts.threads)
    key = lambda c: c  # noqa: E731 - a cell is its own key
    run = lambda group: results.run(group, key=key, measure=lambda c: measure(pipe, opts, c), plot=plot,  # noqa: E731
                                    after=summarise)
    todo = cells(opts)
    # priority order: AGD vs CFG (20 steps), the unguided reference, wall time, the forward-noised baseline,
    # then the compositions (an interrupted run keeps what it measured)
    run([c for c in todo if c["variant"] == "20 steps" and c["method"] != "forward_noised"])
    if opts.repeats > 0 and not results.data.get("wall_time"):
        results.data["wall_time"] = wall_time(pipe, opts)
        results.save()
    fn_cells = [c for c in todo if c["method"] == "forward_noised"]
    if fn_cells:
        results.data["training"]["forward_noised"] = train(opts, "forward_noised", store)
        results.save()
        run(fn_cells)
    if opts.compose:
        run([c for c in todo if c["variant"] != "20 steps"])
    summarise(results.data)
    results.save()
    results.plot(plot)


if __name__ == "__main__":
    main()
