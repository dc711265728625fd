"""``fastgen generate-text`` and ``fastgen eval prophet``: parse options, call :mod:`fastgen.prophet` (which checks
them), print."""
from __future__ import annotations

import argparse
import json
import re
import sys

from .prophet.builtin import BUILTIN_MODEL

# argument names as the library spells them -> the flags of these commands (error messages name the flag)
_FLAGS = {"gen_length": "--gen-length", "block_length": "--block-length", "answer_start": "--answer-start",
          "thresholds": "--thresholds", "steps": "--steps", "temperature": "--temperature", "model": "--model",
          "budgets": "--budgets", "n": "--n", "out": "--out", "overwrite": "--overwrite", "seed": "--seed",
          "progress_mode": "--progress", "prompt": "--prompt"}
_FLAG_PATTERN = re.compile(r"(?<![\w-])(" + "|".join(re.escape(k) for k in sorted(_FLAGS, key=len, reverse=True))
                           + r")(?= must|=|,| path)")
_SWITCHES = {"overwrite=True": "--overwrite"}


def _flag_names(err: Exception) -> Exception:
    """The library's error with its argument names replaced by this command's flags (an existing output file is
    reported like any other bad option: one line, exit code 2)."""
    text = str(err)
    for name, flag in _SWITCHES.items():
        text = text.replace(name, flag)
    return (ValueError if isinstance(err, FileExistsError) else type(err))(_FLAG_PATTERN.sub(
        lambda m: _FLAGS[m.group(1)], text))


def _set_threads(threads: int) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def cmd_generate_text(args) -> int:
    from .prophet.text import generate_text

    _set_threads(args.threads)
    try:
        record = generate_text(args.prompt, model=args.model, prophet=args.prophet, thresholds=args.thresholds,
                               steps=args.steps, gen_length=args.gen_length, block_length=args.block_length,
                               temperature=args.temperature, answer_start=args.answer_start,
                               progress_mode=args.progress, seed=args.seed)
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise _flag_names(err) from None
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



def cmd_eval_prophet(args) -> int:
    from .prophet.benchmark import eval_prophet

    _set_threads(args.threads)

    def report(row):
        if not args.json:
            print(f"{row['method']:>20} steps/block {row['steps_per_block']:>3}: accuracy {100 * row['accuracy']:.1f}%"
                  f"  mean NFE {row['mean_nfe']:.2f}  ({row['wall_seconds']:.1f}s)", file=sys.stderr, flush=True)

    try:
        result, out_json, out_png = eval_prophet(
            out=args.out, overwrite=args.overwrite, progress=report, model=args.model, n=args.n,
            budgets=tuple(args.budgets), gen_length=args.gen_length, block_length=args.block_length,
            thresholds=tuple(args.thresholds), answer_start=None if args.answer_start < 0 else args.answer_start,
            seed=args.seed)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as err:
        raise _flag_names(err) from None
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
    p.add_argument("--out", default="prophet.json",
                   help="result JSON (the plot goes next to it as .png), or an existing folder (default: "
                        "./prophet.json)")
    p.add_argument("--overwrite", action="store_true", help="replace existing result files")
    p.add_argument("--json", action="store_true", help="print the result JSON")


def register_eval(eval_subparsers) -> None:
    p = eval_subparsers.add_parser(
        "prophet", help="accuracy vs forward passes: stock scheduler vs Prophet on held-out arith problems",
        description="Runs the stock BlockRefinementScheduler and ProphetScheduler side by side (same problems, "
                    "budgets and seeds) and writes a JSON and a PNG.",
    )
    add_benchmark_arguments(p)
    p.set_defaults(func=cmd_eval_prophet)

