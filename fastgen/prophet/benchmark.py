"""Benchmark: accuracy against forward passes, stock ``BlockRefinementScheduler`` vs :class:`ProphetScheduler`, side by
side on held-out problems of the built-in arith-dlm task (``fastgen eval prophet``, ``benchmarks/prophet.py``).

Li et al., "Diffusion Language Models Know the Answer Before Decoding", arXiv:2508.19982.

Cells are (method, steps per block); each runs the same problems with the same seeds. Results go through the shared
harness :mod:`fastgen.benchmarking` (atomic JSON after every cell, resumable, PNG plot next to the JSON).

Two baselines: ``baseline`` is the stock ``BlockRefinementScheduler``, which pays ``LLaDA2Pipeline``'s post-block forward
even when a block was emptied early (that forward cannot change a token with editing off); ``baseline-fair`` is the
stock rule without that forward (:class:`ProphetScheduler` with every threshold at ``+inf`` and
``stop_finished_blocks=True``: the same tokens, checked per cell by ``answers_sha256``). Prophet's saving is reported
against both.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .arith import arith_extract_answer, arith_problems
from .builtin import BUILTIN_MODEL
from .criterion import DEFAULT_PHASE_BOUNDARIES, DEFAULT_THRESHOLDS
from .text import load_text_pipeline, resolve_model_path, run_text, validate_text_options

DEFAULT_OUT = "prophet.json"
METHODS = ("baseline", "baseline-fair", "prophet", "prophet-all-in", "prophet-answer-span")
BASELINES = ("baseline", "baseline-fair")
METHOD_LABELS = {"baseline": "stock BlockRefinementScheduler",
                 "baseline-fair": "stock rule, no post-block forward (fair baseline)",
                 "prophet": "ProphetScheduler (masked positions)",
                 "prophet-all-in": "ProphetScheduler (+ later blocks all in)",
                 "prophet-answer-span": "ProphetScheduler (answer span)"}
# options that decide what a cell measures: a results file is resumed only when they match
RESUME_ON = ("model", "n", "gen_length", "block_length", "thresholds", "answer_start", "seed")


@dataclass
class ProphetBenchmarkConfig:
    """Stock BlockRefinementScheduler vs ProphetScheduler on held-out arith-dlm problems: accuracy vs forward passes."""

    model: str = field(default=BUILTIN_MODEL, metadata={"help": f"'{BUILTIN_MODEL}' or an arith-dlm style folder"})
    n: int = field(default=500, metadata={"help": "held-out problems (split 'test', drawn with --seed)"})
    budgets: list[int] = field(default_factory=lambda: [8, 4, 2], metadata={"help": "steps per block to compare"})
    gen_length: int = field(default=24, metadata={"help": "tokens to generate"})
    block_length: int = field(default=8, metadata={"help": "block size (divides --gen-length)"})
    thresholds: list[float] = field(default_factory=lambda: list(DEFAULT_THRESHOLDS),
                                    metadata={"help": "Prophet's gap thresholds (early, mid, late), non-increasing"})
    answer_start: int = field(default=4, metadata={
        "help": "first monitored position of 'prophet-answer-span' (5 tokens; 4 = right after 'The answer is ')"})
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata={"help": f"among {list(METHODS)}"})
    seed: int = field(default=0, metadata={"help": "problem draw; problem i decodes with seed + i"})
    out: str = field(default=DEFAULT_OUT, metadata={
        "help": "result JSON (the plot goes next to it as .png), or an existing folder for prophet.json"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing result file"})
    resume: bool = field(default=False, metadata={
        "help": "continue an existing result file written with the same options (measured cells are kept)"})


def validate_benchmark_config(config: ProphetBenchmarkConfig) -> ProphetBenchmarkConfig:
    """Check every option (needs no model); returns a normalised copy (tuples, floats)."""
    if not isinstance(config, ProphetBenchmarkConfig):
        raise TypeError(f"config must be a ProphetBenchmarkConfig, got {type(config).__name__}.")
    if not isinstance(config.n, int) or isinstance(config.n, bool) or config.n < 1:
        raise ValueError(f"n must be an int >= 1 (held-out problems), got {config.n!r}.")
    if not isinstance(config.seed, int) or isinstance(config.seed, bool):
        raise ValueError(f"seed must be an int, got {config.seed!r}.")
    budgets = config.budgets
    if not isinstance(budgets, (list, tuple)) or not budgets or any(
            not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in budgets):
        raise ValueError(f"budgets must be a non-empty list of positive step counts, got {budgets!r}.")
    methods = config.methods
    if (not isinstance(methods, (list, tuple)) or not methods or any(m not in METHODS for m in methods)
            or len(set(methods)) != len(methods)):
        raise ValueError(f"methods must be distinct names among {list(METHODS)}, got {methods!r}.")
    if config.overwrite and config.resume:
        raise ValueError("overwrite and resume exclude each other: overwrite starts the result file afresh, resume "
                         "continues it.")
    thresholds = validate_text_options(thresholds=config.thresholds, steps=min(budgets), gen_length=config.gen_length,
                                       block_length=config.block_length, answer_start=config.answer_start)
    return dataclasses.replace(config, budgets=list(budgets), methods=list(methods), thresholds=list(thresholds))


def load_method(method: str, config: ProphetBenchmarkConfig):
    """The pipeline of one benchmark method: the stock scheduler, or Prophet with the method's monitored set."""
    if method == "baseline":
        return load_text_pipeline(config.model, prophet=False)
    if method == "baseline-fair":  # never fires: the stock rule, minus the post-block forwards that change nothing
        inf = float("inf")
        return load_text_pipeline(config.model, prophet=True, thresholds=(inf, inf, inf), stop_finished_blocks=True)
    extra = {"prophet-all-in": {"commit_later_blocks": True},
             "prophet-answer-span": {"answer_start": config.answer_start}}.get(method, {})
    return load_text_pipeline(config.model, prophet=True, thresholds=config.thresholds, **extra)


def measure(pipe, problems: Sequence[dict], *, steps: int, gen_length: int, block_length: int, seed: int,
            tick: Callable[[], object] | None = None) -> dict:
    """One cell: decode every problem (seed + index), score the answers, count forward passes and Prophet's commits.
    ``answers_sha256`` hashes every decoded text (equal hashes: token-identical outputs). ``tick()`` runs after each
    problem (a progress bar)."""
    from .scheduler import ProphetScheduler

    digest = _answers_digest()
    correct, nfes, fired, t0, c0 = 0, [], 0, time.perf_counter(), time.process_time()
    for i, p in enumerate(problems):
        res = run_text(pipe, p["prompt"], steps=steps, gen_length=gen_length, block_length=block_length,
                       seed=seed + i)
        digest.update(res["texts"][0].encode() + b"\0")
        correct += arith_extract_answer(res["texts"][0]) == p["answer"]
        nfes.append(res["nfe"])
        fired += bool(res["fired_at_step"] and res["fired_at_step"][0])
        if tick is not None:
            tick()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = len(problems)
    prophet = isinstance(pipe.scheduler, ProphetScheduler) and min(pipe.scheduler.thresholds) < float("inf")
    return {"accuracy": correct / n, "correct": correct, "mean_nfe": sum(nfes) / n, "total_nfe": sum(nfes),
            "fired_fraction": fired / n if prophet else None,
            "wall_seconds": round(wall, 2), "ms_per_problem": round(1000 * wall / n, 2),
            "cpu_seconds": round(cpu, 2), "answers_sha256": digest.hexdigest()}


def _answers_digest():
    """The running hash of decoded texts behind ``answers_sha256`` (each text followed by a NUL byte)."""
    import hashlib

    return hashlib.sha256()


def compare_to_baseline(cells: list[dict]) -> list[dict]:
    """Per method, budget and baseline (``baseline``, and ``baseline-fair`` where measured): NFE reduction, wall-time
    speed-up and accuracy change against that baseline. The fair baseline is compared with the stock one too, with
    ``identical_answers`` (token-identical outputs) where both cells carry ``answers_sha256``."""
    out = []
    for kind in BASELINES:
        for base in (c for c in cells if c["method"] == kind):
            others = [c for c in cells if c["steps_per_block"] == base["steps_per_block"] and c["method"] not in BASELINES]
            if kind == "baseline":
                others = [c for c in cells if c["steps_per_block"] == base["steps_per_block"]
                          and c["method"] == "baseline-fair"] + others
            for pro in others:
                reduction = base["mean_nfe"] / pro["mean_nfe"]
                delta = 100 * (pro["accuracy"] - base["accuracy"])
                row = {
                    "method": pro["method"], "baseline": kind, "steps_per_block": base["steps_per_block"],
                    "nfe_reduction": round(reduction, 3),
                    "wall_speedup": round(base["wall_seconds"] / max(pro["wall_seconds"], 1e-9), 3),
                    "accuracy_delta_points": round(delta, 2), "meets_target": reduction >= 2.0 and delta >= -1.0,
                }
                if pro["method"] == "baseline-fair" and "answers_sha256" in base and "answers_sha256" in pro:
                    row["identical_answers"] = base["answers_sha256"] == pro["answers_sha256"]
                out.append(row)
    return out


def interleaved_wall_time(config: ProphetBenchmarkConfig, *, steps: int, methods: Sequence[str], n: int,
                          repeats: int = 3) -> list[dict]:
    """Seconds per problem of ``methods`` at ``steps`` per block, measured side by side in one process: the first ``n``
    problems of the benchmark's draw, each decoded by every method in turn (the order rotates per problem), ``repeats``
    passes over them, median of the per-pass totals. Rows carry the time and forward-pass ratios against ``baseline``
    and ``baseline-fair`` where those are among ``methods``, and ``answers_sha256`` of the first pass's texts."""
    import statistics

    config = validate_benchmark_config(config)
    methods = list(methods)
    if not methods or any(m not in METHODS for m in methods):
        raise ValueError(f"methods must be names among {list(METHODS)}, got {methods!r}.")
    if not isinstance(n, int) or not 1 <= n <= config.n or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"n must be in 1..{config.n} and repeats >= 1, got n={n!r}, repeats={repeats!r}.")
    problems = arith_problems(config.n, split="test", seed=config.seed)[:n]
    pipes = {m: load_method(m, config) for m in methods}
    kwargs = dict(steps=steps, gen_length=config.gen_length, block_length=config.block_length)
    for m in methods:  # warm-up
        run_text(pipes[m], problems[0]["prompt"], seed=config.seed, **kwargs)
    totals = {m: [] for m in methods}
    nfe = dict.fromkeys(methods, 0)
    digests = {m: _answers_digest() for m in methods}
    for r in range(repeats):
        spent = dict.fromkeys(methods, 0.0)
        for i, p in enumerate(problems):
            k = (i + r) % len(methods)
            for m in methods[k:] + methods[:k]:
                t0 = time.perf_counter()
                res = run_text(pipes[m], p["prompt"], seed=config.seed + i, **kwargs)
                spent[m] += time.perf_counter() - t0
                if r == 0:
                    nfe[m] += res["nfe"]
                    digests[m].update(res["texts"][0].encode() + b"\0")
        for m in methods:
            totals[m].append(spent[m])
    med = {m: statistics.median(totals[m]) for m in methods}
    rows = []
    for m in methods:
        row = {"method": m, "steps_per_block": steps, "problems": n, "repeats": repeats,
               "ms_per_problem": round(1000 * med[m] / n, 3), "mean_nfe": nfe[m] / n,
               "answers_sha256": digests[m].hexdigest()}
        for base in BASELINES:
            if base in methods and base != m:
                row[f"time_ratio_vs_{base}"] = round(med[m] / med[base], 4)
                row[f"nfe_ratio_vs_{base}"] = round(nfe[m] / nfe[base], 4)
        rows.append(row)
    return rows


def summary_lines(result: dict) -> list[str]:
    """One line per comparison (reduction in forward passes, accuracy change), then the files written if any."""
    lines = [f"{c['method']:>20} vs {c.get('baseline', 'baseline'):>13} steps/block {c['steps_per_block']:>3}: "
             f"{c['nfe_reduction']:.2f}x fewer forward passes, accuracy {c['accuracy_delta_points']:+.1f} points, "
             f"target met: {c['meets_target']}"
             + (f", identical answers: {c['identical_answers']}" if "identical_answers" in c else "")
             for c in result["comparisons"]]
    if "out" in result:
        lines.append(f"wrote {result['out']} and {result['plot']}")
    return lines


def _about(config: ProphetBenchmarkConfig) -> dict:
    import torch

    from ..runtime import available_cores

    return {
        "benchmark": "prophet", "task": "arith-dlm held-out problems (fastgen.prophet.arith_problems, split='test')",
        "phase_boundaries": list(DEFAULT_PHASE_BOUNDARIES), "progress_mode": "block",
        "answer_span": [config.answer_start, 5],
        "decoding": "diffusers LLaDA2Pipeline, greedy (temperature 0), low-confidence top-k commits (threshold=1.0), "
                    "eos_early_stop on, editing off, batch size 1, generator seed = seed + problem index",
        "nfe": "forward passes of the model counted by a hook, the pipeline's post-block forwards included",
        "hardware": f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} torch thread(s), "
                    f"{available_cores()} core(s) available",
        "torch": torch.__version__,
        "target": ">= 2x fewer forward passes at accuracy within 1 point of the baseline",
    }


def run_prophet_benchmark(config: ProphetBenchmarkConfig | None = None, *, cells: list[dict] | None = None,
                          on_cell: Callable[[dict], None] | None = None, progress: bool = False,
                          **options) -> dict:
    """Measure every (method, steps per block) cell of ``config`` (or ``ProphetBenchmarkConfig(**options)``) that is
    not in ``cells`` yet (new cells are appended to it); writes nothing.

    Prophet runs with its default monitored set (the masked positions of the active block), with
    ``commit_later_blocks=True`` ("all in": after a trigger each later block costs one forward), and monitoring the
    answer span (5 tokens from ``answer_start``, the reference code's choice). ``on_cell(cell)`` runs after each new
    cell (the harness saves there); ``progress`` shows a bar on stderr. Returns ``{"config", "cells",
    "comparisons", ...}`` (what the result file holds).
    """
    if config is None:
        config = ProphetBenchmarkConfig(**options)
    elif options:
        raise TypeError(f"give either config or options, got both (options {sorted(options)}).")
    config = validate_benchmark_config(config)
    resolve_model_path(config.model)
    cells = cells if cells is not None else []
    todo = [(steps, m) for steps in config.budgets for m in config.methods
            if not any(c["method"] == m and c["steps_per_block"] == steps for c in cells)]
    problems = arith_problems(config.n, split="test", seed=config.seed) if todo else []
    pipes: dict = {}
    from tqdm.auto import tqdm

    with tqdm(total=len(todo) * config.n, disable=not progress, desc="prophet benchmark", unit="problem") as bar:
        for steps, method in todo:
            if method not in pipes:
                pipes[method] = load_method(method, config)
            bar.set_postfix(method=method, steps=steps)
            cell = {"method": method, "steps_per_block": steps,
                    **measure(pipes[method], problems, steps=steps, gen_length=config.gen_length,
                              block_length=config.block_length, seed=config.seed, tick=bar.update)}
            cells.append(cell)
            if on_cell is not None:
                on_cell(cell)
    return {"config": _options(config), **_about(config), "cells": cells, "comparisons": compare_to_baseline(cells)}


def _options(config: ProphetBenchmarkConfig) -> dict:
    """What the cells depend on (not where they are written)."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in ("out", "overwrite", "resume")}


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
            raise FileExistsError(f"overwrite must be set to replace the existing file {p} (or choose another out "
                                  f"path).")
    return paths


def _read_results_to_resume(path: Path, options: dict) -> None:
    """Refuse to resume a file that is not a Prophet result file or was written with other options."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"resume: cannot read the result file {path} ({type(err).__name__}: {err}).") from None
    old = data.get("config") if isinstance(data, dict) else None
    if not isinstance(old, dict) or data.get("benchmark") != "prophet" or not isinstance(data.get("cells"), list):
        raise ValueError(f"resume: {path} is not a Prophet benchmark result file.")
    differ = [f"{k}: {old.get(k)!r} there, {options[k]!r} now" for k in RESUME_ON if old.get(k) != options[k]]
    if differ:
        raise ValueError(f"resume: {path} was written with other options ({'; '.join(differ)}); use overwrite or "
                         f"another out path.")


def plot_prophet_benchmark(result: dict, path: str | os.PathLike) -> None:
    """Accuracy against mean forward passes (log scale), one line per method, labelled with the steps per block."""
    from ..benchmarking import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for (name, label), style in zip(METHOD_LABELS.items(), ("o-", "o--", "s-", "D-", "^-")):
        rs = sorted((c for c in result["cells"] if c["method"] == name), key=lambda c: c["mean_nfe"])
        if not rs:
            continue
        ax.plot([c["mean_nfe"] for c in rs], [100 * c["accuracy"] for c in rs], style, label=label)
        for c in rs:  # label the budget once per method, left of each marker for Prophet, right for the baseline
            ax.annotate(f"{c['steps_per_block']}", (c["mean_nfe"], 100 * c["accuracy"]), fontsize=7,
                        textcoords="offset points", xytext=(5, 4) if name in BASELINES else (-4, 5), ha="center")
    accs = [100 * c["accuracy"] for c in result["cells"]]
    ax.set_ylim(max(0.0, min(accs) - 5.0), min(100.0, max(accs) + 3.0))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("forward passes per problem (mean, log scale)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(f"Prophet on arith-dlm: {result['config']['n']} held-out problems (labels: steps per block)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        fig.savefig(tmp, dpi=120, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def eval_prophet(config: ProphetBenchmarkConfig | None = None, *, progress: bool = False, **options) -> dict:
    """``fastgen eval prophet``: check the options and the output paths, measure the cells not yet in the result
    file (all of them unless ``resume``), saving it after each, then plot. Returns the result with ``out`` and
    ``plot`` (the two paths written).

    Writes only ``config.out`` (default ``./prophet.json``) and its ``.png``; an existing file is replaced only with
    ``overwrite``, or continued with ``resume`` when it was written with the same options.
    """
    from ..benchmarking import Results

    config = validate_benchmark_config(config if config is not None else ProphetBenchmarkConfig(**options))
    json_path, png_path = benchmark_output_paths(config.out, overwrite=config.overwrite or config.resume)
    options = _options(config)
    if config.resume and json_path.exists():
        _read_results_to_resume(json_path, options)
    resolve_model_path(config.model)  # a missing model folder fails before anything is written
    results = Results(json_path, options, resume_on=RESUME_ON, fresh=not config.resume)

    def save(_cell: dict) -> None:
        results.data.update(_about(config), comparisons=compare_to_baseline(results.cells))
        results.save()

    result = run_prophet_benchmark(config, cells=results.cells, on_cell=save, progress=progress)
    results.data.update(result)
    results.save()
    plot_prophet_benchmark(results.data, png_path)
    return {**results.data, "out": str(json_path), "plot": str(png_path)}
