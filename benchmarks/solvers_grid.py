"""Side-by-side samples of the solvers at one NFE on the built-in digits model (same seeds per column).

    python benchmarks/solvers_grid.py --nfe 5 --out benchmarks/results/solvers_nfe5_grid.png
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ROWS = [("DPM", "dpmsolver++"), ("UniP", "unipc"), ("DEIS", "deis"), ("DDIM", "ddim"), ("USF", "usf-default"),
        ("S3", "s3")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nfe", type=int, default=5, choices=[4, 5, 6, 8, 10])
    p.add_argument("--per-class", type=int, default=2, help="images per digit")
    p.add_argument("--scale", type=float, default=3.0)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "solvers_nfe5_grid.png"))
    args = p.parse_args()
    torch.set_num_threads(1)
    import fastgen
    from fastgen.grid import image_grid
    from fastgen.solvers import SolverSchedule
    pipe = fastgen.load_builtin("digits")
    pipe.set_progress_bar_config(disable=True)
    labels = [c for c in range(10) for _ in range(args.per_class)]
    seeds = list(range(500, 500 + len(labels)))
    images = []
    for _, solver in ROWS:
        if solver == "s3":
            solver = SolverSchedule.load(REPO / "fastgen" / "assets" / "digits-schedules" / f"nfe{args.nfe}.json")
        out = pipe(class_labels=labels, seed=seeds, num_inference_steps=args.nfe, guidance_scale=args.scale,
                   solver=solver, output_type="np")
        images.extend(list(out.images))
    title = (f"digits, CFG {args.scale}, NFE {args.nfe} (x2 for CFG), same seed per column: DPM-Solver++ 2M, UniPC, "
             f"DEIS, DDIM, USF default, S3-searched")
    image_grid(images, ncols=len(labels), row_labels=[r for r, _ in ROWS], cell_size=32, title=title).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
