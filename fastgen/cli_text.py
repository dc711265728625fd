"""``fastgen generate-text`` and ``fastgen eval prophet``: Prophet early-commit decoding from the command line."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

BUILTIN_MODEL = "arith-dlm"


def _validate_text_args(args) -> tuple[float, float, float]:
    """All checks that need no model: fail before loading anything."""
    from .prophet import validate_thresholds

    thresholds = validate_thresholds(args.thresholds, name="--thresholds")
    for name in ("steps", "gen_length", "block_length"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}.")
    if args.gen_length % args.block_length:
        raise ValueError(
            f"--gen-length must be a multiple of --block-length, got --gen-length {args.gen_length} and "
            f"--block-length {args.block_length}."
        )
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}.")
    return thresholds


def load_text_pipeline(model: str | None, *, prophet: bool, thresholds, answer_start: int | None = None,
                       progress_mode: str = "block", commit_later_blocks: bool = False):
    """``LLaDA2Pipeline`` for the built-in model (``None`` or ``"arith-dlm"``) or an arith-dlm style folder."""
    from . import builtin_path
    from .prophet import load_builtin_dlm

    if model is None or model == BUILTIN_MODEL:
        path = builtin_path(BUILTIN_MODEL)
    else:
        path = Path(model)
        if not path.is_dir():
            raise FileNotFoundError(f"--model must be '{BUILTIN_MODEL}' or a model folder, got {model!r}.")
    kwargs = {}
    if prophet:
        kwargs = dict(early_threshold=thresholds[0], mid_threshold=thresholds[1], late_threshold=thresholds[2],
                      answer_start=answer_start, progress_mode=progress_mode,
                      commit_later_blocks=commit_later_blocks)
    pipe = load_builtin_dlm(path, prophet=prophet, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_text(pipe, prompt, *, steps: int, gen_length: int, block_length: int, seed: int = 0,
             temperature: float = 0.0, threshold: float = 1.0) -> dict:
    """One generation with exact forward counting. ``prompt`` may be a list (same token length for batching)."""
    import torch

    from .prophet import NFECounter, ProphetScheduler

    scheduler = pipe.scheduler
    if isinstance(scheduler, ProphetScheduler) and scheduler.config.progress_mode == "global":
        # total refinement steps = steps per block x generated blocks (the pipeline's num_timesteps)
        prompt_len = len(pipe.tokenizer(prompt if isinstance(prompt, str) else prompt[0]).input_ids)
        blocks = (prompt_len + gen_length + block_length - 1) // block_length - prompt_len // block_length
        scheduler.set_total_steps(min(steps, gen_length) * blocks)
    generator = torch.Generator().manual_seed(seed)
    with NFECounter(pipe.model) as counter:
        out = pipe(prompt=prompt, gen_length=gen_length, block_length=block_length, num_inference_steps=steps,
                   temperature=temperature, threshold=threshold, editing_threshold=None, use_chat_template=False,
                   generator=generator)
    fired = getattr(scheduler, "fired_at", None)
    return {"texts": out.texts, "nfe": counter.count, "step_budget": pipe.num_timesteps,
            "fired_at_step": list(fired) if fired is not None else None}


def cmd_generate_text(args) -> int:
    thresholds = _validate_text_args(args)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_text_pipeline(args.model, prophet=args.prophet, thresholds=thresholds,
                              answer_start=args.answer_start, progress_mode=args.progress)
    res = run_text(pipe, args.prompt, steps=args.steps, gen_length=args.gen_length, block_length=args.block_length,
                   seed=args.seed, temperature=args.temperature)
    record = {
        "prompt": args.prompt, "text": res["texts"][0], "prophet": args.prophet,
        "thresholds": list(thresholds) if args.prophet else None, "nfe": res["nfe"],
        "steps_used": res["nfe"], "step_budget": res["step_budget"],
        "fired_at_step": res["fired_at_step"][0] if res["fired_at_step"] else None,
    }
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print(f"{args.prompt}{record['text']}")
        fired = f", Prophet committed at step {record['fired_at_step']}" if record["fired_at_step"] else ""
        print(f"[{record['nfe']} forward passes of a {record['step_budget']}-step budget{fired}]", file=sys.stderr)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate-text",
        help="generate text with a masked diffusion LM (default: the built-in arith-dlm), with Prophet early commit",
        description="Decode with diffusers' LLaDA2Pipeline; --prophet swaps in fastgen.prophet.ProphetScheduler "
                    "(Li et al., arXiv:2508.19982), which commits all remaining tokens once the top-2 logit gap "
                    "clears the thresholds.",
    )
    p.add_argument("--prompt", default="Which is larger, 312 or 98? ", help="prompt text (default: %(default)r)")
    p.add_argument("--prophet", action=argparse.BooleanOptionalAction, default=True,
                   help="use Prophet early commit (default: on); --no-prophet runs the stock scheduler")
    p.add_argument("--thresholds", type=float, nargs=3, default=[7.5, 5.0, 2.5], metavar=("EARLY", "MID", "LATE"),
                   help="gap thresholds per phase, non-increasing (default: 7.5 5.0 2.5)")
    p.add_argument("--model", default=None, help=f"'{BUILTIN_MODEL}' (default) or a model folder")
    p.add_argument("--steps", type=int, default=8, help="refinement steps per block (default: 8)")
    p.add_argument("--gen-length", type=int, default=24, help="tokens to generate (default: 24)")
    p.add_argument("--block-length", type=int, default=8, help="block size (default: 8)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0, greedy)")
    p.add_argument("--answer-start", type=int, default=None,
                   help="monitor the 5-token span from this generation position (default: the block's masks)")
    p.add_argument("--progress", choices=["block", "global"], default="block",
                   help="phase progress within the block or over the whole generation (default: block)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads, 0 = torch's choice (default: 1; the models this targets on CPU are tiny)")
    p.add_argument("--json", action="store_true", help="print a JSON record (text, nfe, steps used, budget)")
    p.set_defaults(func=cmd_generate_text)


# --------------------------------------------------------------------------------------------------------------------
# Benchmark: accuracy vs forward passes, stock scheduler vs Prophet, on held-out problems of the built-in task
# --------------------------------------------------------------------------------------------------------------------


def run_prophet_benchmark(*, model=None, n: int = 500, budgets=(8, 4, 2), gen_length: int = 24,
                          block_length: int = 8, thresholds=(7.5, 5.0, 2.5), answer_start: int | None = 4,
                          seed: int = 0, progress=None) -> dict:
    """Stock ``BlockRefinementScheduler`` vs ``ProphetScheduler`` on the same held-out problems, budgets and seeds.

    Prophet runs with its default monitored set (the masked positions of the active block), with
    ``commit_later_blocks=True`` ("all in": after a trigger each later block costs one forward) and, when
    ``answer_start`` is given, monitoring the answer span (5 tokens from ``answer_start``, the reference code's
    choice; 4 = right after "The answer is " in the built-in task).
    """
    import platform

    import torch

    from .prophet import arith_extract_answer, arith_problems, validate_thresholds

    thresholds = validate_thresholds(thresholds)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    if not budgets or any(b < 1 for b in budgets):
        raise ValueError(f"budgets must be positive step counts, got {budgets!r}.")
    if gen_length % block_length:
        raise ValueError(f"gen_length must be a multiple of block_length, got {gen_length} and {block_length}.")
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
    comparisons = []
    for steps in budgets:
        base = next(r for r in rows if r["method"] == "baseline" and r["steps_per_block"] == steps)
        for name in methods:
            if name == "baseline":
                continue
            pro = next(r for r in rows if r["method"] == name and r["steps_per_block"] == steps)
            reduction = base["mean_nfe"] / pro["mean_nfe"]
            delta = 100 * (pro["accuracy"] - base["accuracy"])
            comparisons.append({
                "method": name, "steps_per_block": steps, "nfe_reduction": round(reduction, 3),
                "wall_speedup": round(base["wall_seconds"] / max(pro["wall_seconds"], 1e-9), 3),
                "accuracy_delta_points": round(delta, 2), "meets_target": reduction >= 2.0 and delta >= -1.0,
            })
    return {
        "benchmark": "prophet", "task": "arith-dlm held-out problems (fastgen.prophet.arith_problems, split='test')",
        "model": model or BUILTIN_MODEL, "n_problems": n, "gen_length": gen_length, "block_length": block_length,
        "thresholds": list(thresholds), "phase_boundaries": [0.33, 0.67], "progress_mode": "block",
        "answer_span": None if answer_start is None else [answer_start, 5],
        "decoding": "diffusers LLaDA2Pipeline, greedy (temperature 0), low-confidence top-k commits (threshold=1.0), "
        "eos_early_stop on, editing off, batch size 1, generator seed = seed + problem index",
        "nfe": "forward passes of the model counted by a hook, the pipeline's post-block forwards included",
        "seed": seed, "hardware": f"CPU ({platform.processor() or platform.machine()}), "
        f"{torch.get_num_threads()} torch thread(s), 2-core machine shared with other jobs", "torch": torch.__version__,
        "target": ">= 2x fewer forward passes at accuracy within 1 point of the baseline",
        "results": rows, "comparisons": comparisons,
    }


def plot_prophet_benchmark(result: dict, path: str | Path) -> None:
    import matplotlib

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
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def cmd_eval_prophet(args) -> int:
    from .prophet import validate_thresholds

    validate_thresholds(args.thresholds, name="--thresholds")
    if args.gen_length % args.block_length:
        raise ValueError(f"--gen-length must be a multiple of --block-length, got {args.gen_length} and "
                         f"{args.block_length}.")
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}.")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    def report(row):
        if not args.json:
            print(f"{row['method']:>20} steps/block {row['steps_per_block']:>3}: accuracy {100 * row['accuracy']:.1f}%"
                  f"  mean NFE {row['mean_nfe']:.2f}  ({row['wall_seconds']:.1f}s)", file=sys.stderr, flush=True)

    result = run_prophet_benchmark(model=args.model, n=args.n, budgets=tuple(args.budgets),
                                   gen_length=args.gen_length, block_length=args.block_length,
                                   thresholds=tuple(args.thresholds),
                                   answer_start=None if args.answer_start < 0 else args.answer_start,
                                   seed=args.seed, progress=report)
    out_json, out_png = Path(args.out_json), Path(args.out_png)
    _write_atomic(out_json, json.dumps(result, indent=2) + "\n")
    plot_prophet_benchmark(result, out_png)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for c in result["comparisons"]:
            print(f"{c['method']:>20} steps/block {c['steps_per_block']:>3}: "
                  f"{c['nfe_reduction']:.2f}x fewer forward passes, "
                  f"accuracy {c['accuracy_delta_points']:+.1f} points, target met: {c['meets_target']}")
        print(f"wrote {out_json} and {out_png}")
    return 0


def add_benchmark_arguments(p) -> None:
    p.add_argument("--model", default=None, help=f"'{BUILTIN_MODEL}' (default) or a model folder")
    p.add_argument("--n", type=int, default=500, help="held-out problems (default: 500)")
    p.add_argument("--budgets", type=int, nargs="+", default=[8, 4, 2],
                   help="steps per block to compare (default: 8 4 2)")
    p.add_argument("--gen-length", type=int, default=24)
    p.add_argument("--block-length", type=int, default=8)
    p.add_argument("--thresholds", type=float, nargs=3, default=[7.5, 5.0, 2.5], metavar=("EARLY", "MID", "LATE"))
    p.add_argument("--answer-start", type=int, default=4,
                   help="also run Prophet monitoring the 5-token span from this generation position (default: 4, "
                        "right after 'The answer is '; -1 = skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    p.add_argument("--out-json", default="benchmarks/results/prophet.json")
    p.add_argument("--out-png", default="benchmarks/results/prophet.png")
    p.add_argument("--json", action="store_true", help="print the result JSON")


def register_eval(eval_subparsers) -> None:
    p = eval_subparsers.add_parser(
        "prophet", help="accuracy vs forward passes: stock scheduler vs Prophet on held-out arith problems",
        description="Runs the stock BlockRefinementScheduler and ProphetScheduler side by side (same problems, "
                    "budgets and seeds) and writes a JSON and a PNG.",
    )
    add_benchmark_arguments(p)
    p.set_defaults(func=cmd_eval_prophet)

