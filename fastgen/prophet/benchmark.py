"""Benchmark: accuracy against forward passes, stock ``BlockRefinementScheduler`` vs :class:`ProphetScheduler`, side by
side on held-out problems of the built-in arith-dlm task (``fastgen eval prophet``, ``benchmarks/prophet.py``).

Li et al., "Diffusion Language Models Know the Answer Before Decoding", arXiv:2508.19982.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from .arith import arith_extract_answer, arith_problems
from .builtin import BUILTIN_MODEL
from .criterion import DEFAULT_PHASE_BOUNDARIES, DEFAULT_THRESHOLDS
from .text import load_text_pipeline, run_text, validate_text_options

DEFAULT_OUT = "prophet.json"


def validate_benchmark_options(*, n: int, budgets: Sequence[int], gen_length: int, block_length: int,
                               thresholds: Sequence[float], answer_start: int | None,
                               seed: int) -> tuple[float, float, float]:
    """Check :func:`run_prophet_benchmark`'s options (needs no model); returns the thresholds."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be an int >= 1 (held-out problems), got {n!r}.")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}.")
    budgets = tuple(budgets) if isinstance(budgets, (list, tuple)) else budgets
    if not isinstance(budgets, tuple) or not budgets or any(
            not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in budgets):
        raise ValueError(f"budgets must be a non-empty list of positive step counts, got {budgets!r}.")
    return validate_text_options(thresholds=thresholds, steps=min(budgets), gen_length=gen_length,
                                 block_length=block_length, answer_start=answer_start)


def run_prophet_benchmark(*, model=None, n: int = 500, budgets: Sequence[int] = (8, 4, 2), gen_length: int = 24,
                          block_length: int = 8, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                          answer_start: int | None = 4, seed: int = 0,
                          progress: Callable[[dict], None] | None = None) -> dict:
    """Stock ``BlockRefinementScheduler`` vs ``ProphetScheduler`` on the same held-out problems, budgets and seeds.

    Prophet runs with its default monitored set (the masked positions of the active block), with
    ``commit_later_blocks=True`` ("all in": after a trigger each later block costs one forward) and, when
    ``answer_start`` is given, monitoring the answer span (5 tokens from ``answer_start``, the reference code's
    choice; 4 = right after "The answer is " in the built-in task). ``progress`` is called with each result row.
    """
    thresholds = validate_benchmark_options(n=n, budgets=budgets, gen_length=gen_length, block_length=block_length,
                                            thresholds=thresholds, answer_start=answer_start, seed=seed)
    problems = arith_problems(n, split="test", seed=seed)
    methods = {
        "baseline": load_text_pipeline(model, prophet=False, thresholds=thresholds),
        "prophet": load_text_pipeline(model, prophet=True, thresholds=thresholds),
        "prophet-all-in": load_text_pipeline(model, prophet=True, thresholds=thresholds, commit_later_blocks=True),
    }
    if answer_start is not None:
        methods["prophet-answer-span"] = load_text_pipeline(model, prophet=True, thresholds=thresholds,
                                                            answer_start=answer_start)
    rows = []
    for steps in budgets:
        for name, pipe in methods.items():
            correct, nfes, fired, t0 = 0, [], 0, time.perf_counter()
            for i, p in enumerate(problems):
                res = run_text(pipe, p["prompt"], steps=steps, gen_length=gen_length, block_length=block_length,
                               seed=seed + i)
                correct += arith_extract_answer(res["texts"][0]) == p["answer"]
                nfes.append(res["nfe"])
                fired += bool(res["fired_at_step"] and res["fired_at_step"][0])
            wall = time.perf_counter() - t0
            rows.append({
                "method": name, "steps_per_block": steps, "accuracy": correct / n, "correct": correct,
                "mean_nfe": sum(nfes) / n, "total_nfe": sum(nfes),
                "fired_fraction": None if name == "baseline" else fired / n,
                "wall_seconds": round(wall, 2), "ms_per_problem": round(1000 * wall / n, 2),
            })
            if progress:
                progress(rows[-1])
    return {
        "benchmark": "prophet", "task": "arith-dlm held-out problems (fastgen.prophet.arith_problems, split='test')",
        "model": str(model or BUILTIN_MODEL), "n_problems": n, "gen_length": gen_length,
        "block_length": block_length, "thresholds": list(thresholds),
        "phase_boundaries": list(DEFAULT_PHASE_BOUNDARIES), "progress_mode": "block",
        "answer_span": None if answer_start is None else [answer_start, 5],
        "decoding": "diffusers LLaDA2Pipeline, greedy (temperature 0), low-confidence top-k commits (threshold=1.0), "
        "eos_early_stop on, editing off, batch size 1, generator seed = seed + problem index",
        "nfe": "forward passes of the model counted by a hook, the pipeline's post-block forwards included",
        "seed": seed, "hardware": f"CPU ({platform.processor() or platform.machine()}), "
        f"{torch.get_num_threads()} torch thread(s), 2-core machine shared with other jobs", "torch": torch.__version__,
        "target": ">= 2x fewer forward passes at accuracy within 1 point of the baseline",
        "results": rows, "comparisons": compare_to_baseline(rows),
    }


def compare_to_baseline(rows: list[dict]) -> list[dict]:
    """Per Prophet variant and budget: NFE reduction, wall-time speed-up and accuracy change against the baseline."""
    out = []
    for base in (r for r in rows if r["method"] == "baseline"):
        for pro in (r for r in rows if r["method"] != "baseline" and r["steps_per_block"] == base["steps_per_block"]):
            reduction = base["mean_nfe"] / pro["mean_nfe"]
            delta = 100 * (pro["accuracy"] - base["accuracy"])
            out.append({
                "method": pro["method"], "steps_per_block": base["steps_per_block"],
                "nfe_reduction": round(reduction, 3),
                "wall_speedup": round(base["wall_seconds"] / max(pro["wall_seconds"], 1e-9), 3),
                "accuracy_delta_points": round(delta, 2), "meets_target": reduction >= 2.0 and delta >= -1.0,
            })
    return out


# --------------------------------------------------------------------------------------------------------------------
# Output files: only where the user asked, never over an existing file unless told to
# --------------------------------------------------------------------------------------------------------------------


def benchmark_output_paths(out: str | os.PathLike = DEFAULT_OUT, *, overwrite: bool = False) -> tuple[Path, Path]:
    """The JSON and PNG paths for ``out`` (a ``.json`` file, or an existing folder that receives ``prophet.json``),
    checked before any work: not inside the installed fastgen package, below no existing file, and not existing
    already unless ``overwrite``. The PNG sits next to the JSON with the same stem."""
    path = Path(out)
    if path.is_dir():
        path = path / DEFAULT_OUT
    if path.suffix != ".json":
        raise ValueError(f"out must be a .json file or an existing folder, got {str(out)!r}.")
    paths = (path, path.with_suffix(".png"))
    package = Path(__file__).resolve().parents[1]
    resolved = path.resolve()
    if resolved.is_relative_to(package):
        raise ValueError(f"out must not be inside the installed fastgen package ({package}), got {str(out)!r}.")
    for parent in resolved.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"out must not be below a file, got {str(out)!r} ({parent} is a file).")
    for p in paths:
        if p.is_dir():
            raise ValueError(f"out must not name a folder as the plot or result file, got {str(p)!r}.")
        if p.exists() and not overwrite:
            raise FileExistsError(f"{p} exists; pass overwrite=True to replace it, or choose another out path.")
    return paths


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def plot_prophet_benchmark(result: dict, path: str | os.PathLike) -> None:
    """Accuracy against mean forward passes (log scale), one line per method, labelled with the steps per block."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise ModuleNotFoundError("plotting the Prophet benchmark needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    labels = {"baseline": "stock BlockRefinementScheduler", "prophet": "ProphetScheduler (masked positions)",
              "prophet-all-in": "ProphetScheduler (+ later blocks all in)",
              "prophet-answer-span": "ProphetScheduler (answer span)"}
    for (name, label), style in zip(labels.items(), ("o-", "s-", "D-", "^-")):
        rs = sorted((r for r in result["results"] if r["method"] == name), key=lambda r: r["mean_nfe"])
        if not rs:
            continue
        ax.plot([r["mean_nfe"] for r in rs], [100 * r["accuracy"] for r in rs], style, label=label)
        for r in rs:  # label the budget once per method, left of each marker for Prophet, right for the baseline
            ax.annotate(f"{r['steps_per_block']}", (r["mean_nfe"], 100 * r["accuracy"]), fontsize=7,
                        textcoords="offset points", xytext=(5, 4) if name == "baseline" else (-4, 5), ha="center")
    accs = [100 * r["accuracy"] for r in result["results"]]
    ax.set_ylim(max(0.0, min(accs) - 5.0), min(100.0, max(accs) + 3.0))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("forward passes per problem (mean, log scale)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(f"Prophet on arith-dlm: {result['n_problems']} held-out problems (labels: steps per block)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def save_prophet_benchmark(result: dict, out: str | os.PathLike = DEFAULT_OUT, *,
                           overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``result`` as JSON and its plot as PNG (see :func:`benchmark_output_paths`); returns both paths."""
    json_path, png_path = benchmark_output_paths(out, overwrite=overwrite)
    _write_text_atomic(json_path, json.dumps(result, indent=2) + "\n")
    plot_prophet_benchmark(result, png_path)
    return json_path, png_path


def eval_prophet(*, out: str | os.PathLike = DEFAULT_OUT, overwrite: bool = False,
                 progress: Callable[[dict], None] | None = None, **options) -> tuple[dict, Path, Path]:
    """``fastgen eval prophet``: check the options and the output paths, run :func:`run_prophet_benchmark` with
    ``options``, write the JSON and the PNG. Returns (result, JSON path, PNG path)."""
    defaults = dict(n=500, budgets=(8, 4, 2), gen_length=24, block_length=8, thresholds=DEFAULT_THRESHOLDS,
                    answer_start=4, seed=0)
    unknown = sorted(set(options) - set(defaults) - {"model"})
    if unknown:
        raise TypeError(f"eval_prophet got unknown options {unknown}; accepted: {sorted(defaults) + ['model']}.")
    validate_benchmark_options(**{**defaults, **{k: v for k, v in options.items() if k != "model"}})
    benchmark_output_paths(out, overwrite=overwrite)  # fail before the (long) run
    result = run_prophet_benchmark(progress=progress, **options)
    json_path, png_path = save_prophet_benchmark(result, out, overwrite=overwrite)
    return result, json_path, png_path
