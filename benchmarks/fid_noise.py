"""FID sampling noise on the built-in digits model: one solver configuration, disjoint seed sets.

Tells which FID differences in ``benchmarks/results/solvers.json`` are larger than the noise of a
2,000-sample estimate (same solver, same labels, different initial noise).

    python benchmarks/fid_noise.py --solver unipc --nfe 6 --samples 2000 --sets 4
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--solver", default="unipc", help="diffusers solver name or USF preset")
    p.add_argument("--nfe", type=int, default=6)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--sets", type=int, default=4, help="disjoint seed sets (>= 2)")
    p.add_argument("--scale", type=float, default=3.0)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "solvers_fid_noise.json"))
    args = p.parse_args()
    if args.sets < 2 or args.samples < 2 or args.nfe < 1:
        p.error("--sets must be >= 2, --samples >= 2 and --nfe >= 1")
    torch.set_num_threads(1)
    import fastgen
    from fastgen.solvers.evaluate import DigitsFID, run_schedule
    pipe = fastgen.load_builtin("digits")
    pipe.set_progress_bar_config(disable=True)
    fid = DigitsFID()
    labels = [i % pipe.num_classes for i in range(args.samples)]
    values = []
    for k in range(args.sets):
        seeds = list(range(100_000 + k * args.samples, 100_000 + (k + 1) * args.samples))  # disjoint from the benchmark
        values.append(fid(run_schedule(pipe, (args.solver, args.nfe, None, 0.0), labels, seeds, args.scale)))
        print(f"seed set {k}: FID {values[-1]:.3f}", flush=True)
    rec = {"config": f"{args.solver}@{args.nfe}, CFG {args.scale}", "samples": args.samples, "seed_sets": args.sets,
           "fid": values, "mean": statistics.mean(values), "std": statistics.stdev(values),
           "hardware": "CPU, x86-64, 1 torch thread"}
    Path(args.out).write_text(json.dumps(rec, indent=1) + "\n")
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
