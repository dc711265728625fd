"""``fastgen fit-linear-ag``: fit LinearAG's per-step coefficients on calibration trajectories of a pipeline."""
from __future__ import annotations

import argparse
import json
import time


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "fit-linear-ag",
        help="fit LinearAG coefficients (Castillo et al. 2023) for a model, step count and guidance scale",
        description="Run CFG calibration trajectories of a FastGen pipeline, fit the per-step affine coefficients "
                    "that predict the unconditional noise prediction from past ones, and save them as JSON (by "
                    "default next to the model, where guidance='linear-ag' finds them).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="builtin:digits", help="'builtin:digits' or a diffusers folder")
    p.add_argument("--steps", type=int, default=20, help="sampling steps the coefficients are for")
    p.add_argument("--scale", type=float, default=3.0, help="guidance scale the coefficients are for (> 1)")
    p.add_argument("--n", type=int, default=256, help="calibration samples")
    p.add_argument("--replace-fraction", type=float, default=0.5,
                   help="share of the steps whose unconditional pass is replaced (steps 1 .. int(f*N)-1)")
    p.add_argument("--solver", default=None, help="solver name (default: the pipeline's scheduler)")
    p.add_argument("--prompt", nargs="+", default=None, help="calibration prompts (text-to-image models)")
    p.add_argument("--seed", type=int, default=1_000_000, help="first calibration seed")
    p.add_argument("--batch-size", type=int, default=128, help="samples per batch")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--out", default=None, help="output JSON path (default: <model>/linear_ag/<solver>_steps<N>_scale<w>.json)")
    p.add_argument("--json", action="store_true", help="print a JSON record")
    p.set_defaults(func=run)


def _check(args) -> None:
    for name in ("steps", "n", "batch_size"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}.")
    if not args.scale > 1:
        raise ValueError(f"--scale must be > 1 (LinearAG replaces CFG's unconditional pass), got {args.scale}.")
    if not 0 < args.replace_fraction <= 1:
        raise ValueError(f"--replace-fraction must be in (0, 1], got {args.replace_fraction}.")
    if int(args.replace_fraction * args.steps) < 2:
        raise ValueError(f"--replace-fraction {args.replace_fraction} of --steps {args.steps} replaces no step; "
                         f"use more steps or a larger fraction.")
    if args.solver is not None:
        from .solvers import available_solvers
        if args.solver not in available_solvers():
            raise ValueError(f"--solver must be one of {available_solvers()}, got {args.solver!r}.")
    if args.out is not None and not args.out.lower().endswith(".json"):
        raise ValueError(f"--out must be a .json path, got {args.out!r}.")


def run(args) -> int:
    _check(args)
    from .cli_sample import load_pipeline
    from .guidance.calibrate import fit_linear_ag, save_linear_ag, worst_r2

    pipe = load_pipeline(args.model, "auto", args.device)
    pipe.set_progress_bar_config(disable=True)
    call_kwargs = None
    if not hasattr(pipe, "num_classes"):
        if not args.prompt:
            raise ValueError("--prompt is required for text-to-image models (calibration prompts).")
        prompts = args.prompt
        call_kwargs = lambda first, count: {"prompt": [prompts[(first + j) % len(prompts)] for j in range(count)]}  # noqa: E731
    elif args.prompt:
        raise ValueError("--prompt applies to text-to-image models only; class-conditional models cycle through classes.")
    start = time.perf_counter()
    record = fit_linear_ag(pipe, num_inference_steps=args.steps, guidance_scale=args.scale, num_samples=args.n,
                           replace_fraction=args.replace_fraction, solver=args.solver, seed=args.seed,
                           batch_size=args.batch_size, call_kwargs=call_kwargs)
    path = save_linear_ag(record, args.out, pipe)
    summary = {"output": str(path), "steps": args.steps, "scale": args.scale, "scheduler": record["scheduler"],
               "replaced_steps": sorted(int(k) for k in record["steps"]), "worst_r2": worst_r2(record),
               "seconds": round(time.perf_counter() - start, 2)}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {path}: {len(summary['replaced_steps'])} replaced steps, worst held-out R^2 "
              f"{summary['worst_r2']:.4f} ({summary['seconds']} s)")
    return 0
