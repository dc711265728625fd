"""``fastgen eval fid`` and ``fastgen eval ref``: FID/KID/precision-recall evaluation and reference statistics.

``fastgen eval ref`` turns a dataset (image folder or ``builtin:digits[:split]``) into reference
statistics (``.npz``); ``fastgen eval fid`` scores a set of fake images (a folder, or samples drawn from
a pipeline with given steps/guidance/solver/seeds) against real images or reference statistics.
``python eval/fid.py ...`` is the same command. Under ``accelerate launch`` the processes split the
work (batches of seeds, round robin) and add their sufficient statistics, so the result does not
depend on the number of processes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


# --------------------------------------------------------------------------- argument parsers
def register(subparsers) -> None:
    """No top-level commands: evaluation lives under ``fastgen eval``."""


def register_eval(eval_subparsers) -> None:
    fid = eval_subparsers.add_parser(
        "fid", help="FID/KID/precision-recall of generated images against real images or reference statistics",
        description="Score fake images (a folder, or samples of a pipeline) against real images (a folder, "
                    "builtin:digits[:split]) or reference statistics (.npz). Same as `python eval/fid.py`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_fid_arguments(fid)
    fid.set_defaults(func=run_fid)

    ref = eval_subparsers.add_parser(
        "ref", help="write reference statistics (.npz: float64 mu, sigma + metadata) of a dataset",
        description="Compute FID reference statistics of an image folder or builtin:digits[:split] and write "
                    "them as .npz (keys mu, sigma, readable by pytorch-fid, clean-fid and EDM; plus n, extractor, "
                    "resize_mode and, unless --no-store-features, the raw features for KID and precision/recall).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ref.add_argument("--data", required=True, help="image folder or builtin:digits[:train|heldout|features|all]")
    _add_feature_arguments(ref)
    ref.add_argument("--out", required=True, help="output .npz path")
    ref.add_argument("--store-features", action=argparse.BooleanOptionalAction, default=True,
                     help="also store the raw features (float32) for KID and precision/recall")
    ref.add_argument("--batch-size", type=int, default=256, help="images per feature batch")
    ref.add_argument("--device", default=None, help="torch device (default: accelerate's device for this process)")
    ref.add_argument("--json", action="store_true", help="print a JSON record")
    ref.set_defaults(func=run_ref)


def _add_feature_arguments(p) -> None:
    p.add_argument("--features", default="digits", help="feature extractor: digits, inception or clip")
    p.add_argument("--inception-weights", default=None,
                   help="path of weights-inception-2015-12-05-6726825d.pth (inception features; needs fastgen[inception])")
    p.add_argument("--clip-model", default=None, help="CLIP folder or hub id (clip features)")


def add_fid_arguments(p) -> None:
    """Arguments of ``fastgen eval fid`` (shared with ``eval/fid.py``)."""
    p.add_argument("--real", default="builtin:digits",
                   help="real images: folder, reference statistics .npz, or builtin:digits[:split] (default split: train)")
    p.add_argument("--fake", required=True,
                   help="fake images: a folder of images, or a model to sample (builtin:digits or a pipeline folder)")
    _add_feature_arguments(p)
    p.add_argument("--n", type=int, default=1000, help="samples to draw from a model (ignored for image folders)")
    p.add_argument("--steps", type=int, default=20, help="solver steps when sampling")
    p.add_argument("--guidance", default="cfg", help="guidance method when sampling ('none' for conditional only)")
    p.add_argument("--scale", type=float, default=3.0, help="guidance scale (ignored with --guidance none)")
    p.add_argument("--solver", default=None, help="solver name (default: the pipeline's scheduler)")
    p.add_argument("--seed", type=int, default=0, help="seed of sample 0; sample i uses seed + i and class i %% classes")
    p.add_argument("--batch-size", type=int, default=250, help="images per sampling/feature batch")
    p.add_argument("--kid-subsets", type=int, default=100, help="KID subsets")
    p.add_argument("--kid-subset-size", type=int, default=1000, help="KID subset size (capped at the set sizes)")
    p.add_argument("--pr-k", type=int, default=3, help="k of the k-NN manifolds for precision/recall")
    p.add_argument("--knn-metrics", action=argparse.BooleanOptionalAction, default=True,
                   help="compute KID and precision/recall (they need the raw features of both sets)")
    p.add_argument("--grid", default=None, help="write a PNG grid of the first scored fake images here")
    p.add_argument("--grid-count", type=int, default=64, help="images in the grid")
    p.add_argument("--attention", default="auto", choices=["auto", "sdpa", "xformers"], help="attention backend")
    p.add_argument("--device", default=None, help="torch device (default: accelerate's device for this process)")
    p.add_argument("--json", action="store_true", help="print a JSON record instead of the table")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


# --------------------------------------------------------------------------- commands (the library does the work)
def _is_model(spec: str) -> bool:
    """``--fake`` names a model (``builtin:<name>`` or a pipeline folder) rather than an image folder."""
    return spec.startswith("builtin:") or (Path(spec) / "model_index.json").is_file()


def _state_and_extractor(args):
    from .metrics import get_extractor, resolve_state

    state, device = resolve_state(device=args.device)
    return state, device, get_extractor(args.features, device=device, inception_weights=args.inception_weights,
                                        clip_model=args.clip_model)


def evaluate_fid(args):
    """``fastgen eval fid``: :func:`fastgen.metrics.evaluate_pipeline` or :func:`~fastgen.metrics.evaluate_images`."""
    from .metrics import evaluate_images, evaluate_pipeline

    state, device, extractor = _state_and_extractor(args)
    common = dict(accelerator=state, extractor=extractor, reference=args.real, batch_size=args.batch_size, grid=args.grid,
                  grid_count=args.grid_count, progress=not args.no_progress, knn_metrics=args.knn_metrics,
                  kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size, pr_k=args.pr_k)
    if not _is_model(args.fake):
        result = evaluate_images(args.fake, **common)
        return result, {"real": args.real, "fake": args.fake}
    from .cli_sample import load_pipeline

    pipe = load_pipeline(args.fake, args.attention, str(device))
    pipe.set_progress_bar_config(disable=True)
    guidance = None if args.guidance == "none" else args.guidance
    scale = 1.0 if guidance is None else args.scale
    title = f"{args.fake}  steps={args.steps} {args.guidance} w={scale:g}"
    result = evaluate_pipeline(pipe, args.n, seed=args.seed, grid_title=title, **common,
                               num_inference_steps=args.steps, guidance=guidance, guidance_scale=scale,
                               solver=args.solver)
    return result, {"real": args.real, "fake": args.fake, "steps": args.steps, "guidance": args.guidance,
                    "guidance_scale": scale, "solver": args.solver or "pipeline scheduler", "seed": args.seed}


def format_table(record: dict) -> str:
    """A two-column text table of a result record."""
    rows = []
    for key, value in record.items():
        if value is None:
            continue
        if isinstance(value, float):
            value = f"{value:.6g}" if key.startswith("kid") else f"{value:.4f}"
        rows.append((key, str(value)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run_fid(args) -> int:
    result, options = evaluate_fid(args)
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    record = {**result.to_dict(), **options}
    print(json.dumps(record) if args.json else format_table(record))
    return 0


def run_ref(args) -> int:
    from .metrics import compute_reference

    if not str(args.out).endswith(".npz"):
        raise ValueError(f"--out must be a .npz path, got {args.out!r}.")
    t0 = time.perf_counter()
    state, _, extractor = _state_and_extractor(args)
    ref = compute_reference(args.data, extractor, accelerator=state, batch_size=args.batch_size,
                            store_features=args.store_features)
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    ref.save(args.out)
    record = {"out": str(args.out), "n": ref.n, "extractor": ref.extractor, "resize_mode": ref.resize_mode,
              "num_features": ref.num_features, "features_stored": ref.features is not None,
              "seconds": round(time.perf_counter() - t0, 3)}
    print(json.dumps(record) if args.json else
          f"wrote {args.out}: n={ref.n}, extractor={ref.extractor}, {ref.num_features} features")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``eval/fid.py``: the arguments of ``fastgen eval fid``."""
    parser = argparse.ArgumentParser(prog="fid.py", description="FID evaluation (same as `fastgen eval fid`).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_fid_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_fid(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"fid.py: error: {err}", file=sys.stderr)
        return 2
