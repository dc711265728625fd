"""``fastgen search-schedule`` (S³ solver-schedule search) and ``fastgen teleport-stats`` (Gaussian statistics)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "search-schedule", help="search a per-step solver schedule for a model and NFE (S³)",
        description="S³ search (Liu et al. 2024): evolutionary search over USF solver schedules, screened by a learned "
                    "predictor and scored by FID of a few hundred samples on fixed seeds (digits features; the paper's "
                    "fitness) or by the RMS distance to a high-NFE reference from the same noise. The top candidates "
                    "are re-scored by FID on disjoint seeds. Resumable: state in OUT.state.json, every evaluation "
                    "logged to OUT.log.jsonl.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="builtin:digits", help="'builtin:digits' or a diffusers folder")
    p.add_argument("--nfe", type=int, required=True, help="network evaluations per sample (guidance excluded)")
    p.add_argument("--budget", type=int, default=40, help="true evaluations (model runs) of candidate schedules")
    p.add_argument("--out", required=True, help="where to write the best schedule (.json)")
    p.add_argument("--metric", default="auto", choices=["auto", "fid", "rms"],
                   help="search fitness: 'fid' (digits features; 16x16 one-channel models), 'rms' (distance to a "
                        "high-NFE reference); 'auto' = fid for builtin:digits, rms otherwise")
    p.add_argument("--samples", type=int, default=500, help="samples per evaluation (fixed seeds and labels)")
    p.add_argument("--reference-steps", type=int, default=50, help="steps of the reference solver for --metric rms")
    p.add_argument("--data-mean", default="auto",
                   help="Gaussian statistics file whose mean enables the 'average_x0' first step; 'auto' = the "
                        "shipped digits statistics for builtin:digits, 'none' = leave that option out")
    p.add_argument("--initial", nargs="*", default=[], help="schedule JSONs to evaluate with the seed candidates")
    p.add_argument("--scale", type=float, default=3.0, help="CFG guidance scale used while searching")
    p.add_argument("--teleport", default=None, help="Gaussian statistics file: search schedules whose first step is "
                                                     "this teleport (its target is searched too)")
    p.add_argument("--rescore", type=int, default=3, help="re-score this many top candidates with digits FID")
    p.add_argument("--rescore-samples", type=int, default=1000, help="samples for the FID re-scoring")
    p.add_argument("--seed", type=int, default=0, help="search seed")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print a JSON record")
    p.set_defaults(func=run_search)

    t = subparsers.add_parser(
        "teleport-stats", help="compute Gaussian statistics for analytical teleportation",
        description="Fit N(mu, Sigma) (Wang & Vastola 2024) to the built-in digits data or to model samples, in the "
                    "model's input space, and save it (.safetensors or .npz) for `teleport=`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--source", default="data", choices=["data", "model"],
                   help="'data': the digits training split; 'model': samples of --model")
    t.add_argument("--model", default="builtin:digits", help="model for --source model")
    t.add_argument("--samples", type=int, default=1000, help="model samples for --source model")
    t.add_argument("--steps", type=int, default=20, help="solver steps for --source model")
    t.add_argument("--explained-variance", type=float, default=0.999,
                   help="variance kept by the low-rank fit (used above --max-full-dim dimensions)")
    t.add_argument("--max-full-dim", type=int, default=4096, help="largest dimension with a full eigendecomposition")
    t.add_argument("--per-class", action="store_true",
                   help="one fit per class plus the unconditional fit (ClassGaussianStats, .safetensors): the "
                        "class pipeline then jumps each row with its class and follows the guided ODE under CFG")
    t.add_argument("--out", required=True, help="output file (.safetensors or .npz)")
    t.add_argument("--device", default="cpu", help="torch device")
    t.add_argument("--json", action="store_true", help="print a JSON record")
    t.set_defaults(func=run_teleport_stats)


# ---------------------------------------------------------------------------------------------- search
def run_search(args) -> int:
    for name in ("nfe", "budget", "samples", "reference_steps", "rescore_samples"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}.")
    if args.nfe > 20:
        raise ValueError(f"--nfe must be in 1..20 for a schedule search, got {args.nfe}.")
    if not args.out.endswith(".json"):
        raise ValueError(f"--out must be a .json path, got {args.out!r}.")
    builtin = args.model == "builtin:digits"
    metric = ("fid" if builtin else "rms") if args.metric == "auto" else args.metric
    if metric == "fid" and not builtin:
        raise ValueError("--metric fid scores with the digits feature network, so it needs --model builtin:digits; "
                         "use --metric rms for other models.")
    from .solvers.usf import SolverSchedule
    from .teleport import GaussianStats
    initial = [SolverSchedule.load(path) for path in args.initial]
    stats = GaussianStats.load(args.teleport) if args.teleport is not None else None
    mean_path = args.data_mean
    if mean_path == "auto":
        mean_path = str(Path(__file__).resolve().parent / "assets" / "digits-teleport" / "stats.safetensors") if builtin else "none"
    # rounded: the mean is stored inline in every candidate schedule (and the search log)
    data_mean = None if mean_path == "none" else GaussianStats.load(mean_path).mean.double().mul(1e4).round().div(1e4).tolist()
    import torch
    from .cli_sample import load_pipeline
    from .solvers.search import SearchSpace, search
    from .solvers.evaluate import FIDEvaluator, ScheduleEvaluator
    torch.manual_seed(args.seed)
    pipe = load_pipeline(args.model, "auto", args.device)
    pipe.set_progress_bar_config(disable=True)
    if metric == "fid":
        ev = FIDEvaluator(pipe, samples=args.samples, scale=args.scale, teleport=stats)
    else:
        ev = ScheduleEvaluator(pipe, samples=args.samples, reference_steps=args.reference_steps, scale=args.scale,
                               teleport=stats)
    ns = ev.noise_schedule
    space = SearchSpace(nfe=args.nfe, t_max=ns.t_max, t_min=ns.t_min, lambda_of=ns.lambda_, t_of_lambda=ns.t_from_lambda,
                        teleport_steps=int(stats is not None), data_mean=data_mean)
    out = Path(args.out)
    progress = None
    if not args.no_progress:
        from tqdm.auto import tqdm
        progress = lambda **kw: tqdm(desc=f"S3 nfe={args.nfe}", unit="eval", file=sys.stderr, **kw)  # noqa: E731
    t0, c0 = time.time(), time.process_time()
    records = search(space, ev, budget=args.budget, state_path=str(out) + ".state.json",
                     log_path=str(out) + ".log.jsonl", seed=args.seed, progress=progress, initial=initial)
    best = ev.rescore(records[: args.rescore], args.rescore_samples)
    best.meta.update({"search": {"evaluations": len(records), "budget": args.budget, "samples": args.samples,
                                 "metric": ev.name,
                                 "reference": f"dpmsolver++-2m@{args.reference_steps}" if metric == "rms" else "eval/digits_train_stats.npz",
                                 "guidance_scale": args.scale, "teleport": args.teleport,
                                 "eval_seconds": round(sum(r["seconds"] for r in records), 1),
                                 "cpu_seconds_this_run": round(time.process_time() - c0, 1),
                                 "wall_seconds_this_run": round(time.time() - t0, 1)}})
    best.name = f"s3-nfe{args.nfe}" + ("-teleport" if stats is not None else "")
    best.save(out)
    record = {"out": str(out), "nfe": best.nfe, **best.meta["search"], "search_metric": best.meta.get("search_metric"),
              "fid": best.meta.get("fid")}
    print(json.dumps(record) if args.json else f"best schedule (nfe {best.nfe}, {ev.name} {record['search_metric']:.4g}, "
          f"FID {record['fid']:.4g} on {args.rescore_samples} re-scoring samples) written to {out}")
    return 0


# ---------------------------------------------------------------------------------------------- teleport stats
def run_teleport_stats(args) -> int:
    from .teleport import STATS_FORMATS, GaussianStats
    if not args.out.endswith(STATS_FORMATS):
        raise ValueError(f"--out must end in one of {STATS_FORMATS}, got {args.out!r}.")
    if args.per_class and not args.out.endswith(".safetensors"):
        raise ValueError(f"--per-class statistics are saved as .safetensors, got --out {args.out!r}.")
    if args.samples <= 1 or args.steps <= 0:
        raise ValueError("--samples must be > 1 and --steps positive.")
    if not 0 < args.explained_variance <= 1:
        raise ValueError(f"--explained-variance must be in (0, 1], got {args.explained_variance}.")
    import torch
    if args.source == "data":
        if args.model != "builtin:digits":
            raise ValueError("--source data is the built-in digits training split; use --source model for --model.")
        from .datasets import load_digits_images
        x, y = load_digits_images("train")  # images in [-1, 1], labels
        x = x.float()
    else:
        from .cli_sample import load_pipeline
        pipe = load_pipeline(args.model, "auto", args.device)
        pipe.set_progress_bar_config(disable=True)
        labels = [i % pipe.num_classes for i in range(args.samples)]
        y = torch.tensor(labels)
        chunks = []
        for start in range(0, args.samples, 250):
            lab = labels[start:start + 250]
            chunks.append(pipe(class_labels=lab, num_inference_steps=args.steps, seed=list(range(start, start + len(lab))),
                               output_type="latent").images.cpu())
        x = torch.cat(chunks)
    if args.per_class:
        from .teleport import ClassGaussianStats
        # a class has ~N/C samples: a full covariance would be rank-deficient, so always fit low-rank + isotropic
        stats = ClassGaussianStats.from_samples(x, y, explained_variance=args.explained_variance, max_full_dim=0)
        stats.save(args.out)
        record = {"out": args.out, "source": args.source, "samples": int(x.shape[0]), "shape": list(stats.shape),
                  "classes": len(stats.classes), "ranks": {k: v.rank for k, v in stats.classes.items()}}
        print(json.dumps(record) if args.json else f"{stats} written to {args.out}")
        return 0
    stats = GaussianStats.from_samples(x, explained_variance=args.explained_variance, max_full_dim=args.max_full_dim)
    stats.save(args.out)
    record = {"out": args.out, "source": args.source, "samples": int(x.shape[0]), "shape": list(stats.shape),
              "rank": stats.rank, "residual_variance": stats.residual_variance, "total_variance": stats.total_variance}
    print(json.dumps(record) if args.json else f"{stats} written to {args.out}")
    return 0
