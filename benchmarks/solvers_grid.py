"""Side-by-side samples of the solvers at one NFE on the built-in digits model (same seeds per column).

    python benchmarks/solvers_grid.py --nfe 5 --out benchmarks/results/solvers_nfe5_grid.png
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import fastgen
from fastgen.benchmarking import builtin_pipeline, parse_options
from fastgen.grid import image_grid

SCHEDULES = Path(fastgen.__file__).resolve().parent / "assets" / "digits-schedules"
ROWS = [("DPM", "dpmsolver++"), ("UniP", "unipc"), ("DEIS", "deis"), ("DDIM", "ddim"), ("USF", "usf-default"),
        ("S3", "s3")]


@dataclass
class SolverGrid:
    """Side-by-side samples of the solvers at one NFE on the built-in digits model (same seeds per column)."""

    nfe: int = field(default=5, metadata={"help": "4, 5, 6, 8 or 10 (an S³ schedule exists for these)"})
    per_class: int = field(default=2, metadata={"help": "images per digit"})
    scale: float = 3.0
    out: str = "benchmarks/results/solvers_nfe5_grid.png"


def main(argv=None) -> None:
    opts = parse_options(SolverGrid, argv)
    pipe = builtin_pipeline("digits", threads=1)
    labels = [c for c in range(10) for _ in range(opts.per_class)]
    seeds = list(range(500, 500 + len(labels)))
    images = []
    for _, solver in ROWS:
        if solver == "s3":
            solver = SCHEDULES / f"nfe{opts.nfe}.json"  # the pipeline loads schedule paths itself
        out = pipe(class_labels=labels, seed=seeds, num_inference_steps=opts.nfe, guidance_scale=opts.scale,
                   solver=solver, output_type="np")
        images.extend(list(out.images))
    title = (f"digits, CFG {opts.scale}, NFE {opts.nfe} (x2 for CFG), same seed per column: DPM-Solver++ 2M, UniPC, "
             f"DEIS, DDIM, USF default, S3-searched")
    image_grid(images, ncols=len(labels), row_labels=[r for r, _ in ROWS], cell_size=32, title=title).save(opts.out)
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
