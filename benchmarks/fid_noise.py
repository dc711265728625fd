"""FID sampling noise on the built-in digits model: one solver configuration, disjoint seed sets.

Tells which FID differences in ``benchmarks/results/solvers.json`` are larger than the noise of a
2,000-sample estimate (same solver, same labels, different initial noise). Each seed set is scored by
:func:`fastgen.metrics.evaluate_pipeline`; finished sets are kept and skipped on re-runs. With ``--model`` it
scores a distilled student (a pipeline folder or ``builtin:NAME``, its own steps) instead of the teacher, so
two students can be compared on the same disjoint seed sets.

    python benchmarks/fid_noise.py --solver unipc --nfe 6 --samples 2000 --sets 4
    python benchmarks/fid_noise.py --model runs/digits-2step/student --sets 4 \
        --out benchmarks/results/distill_fid_noise_2step.json
    python benchmarks/fid_noise.py --model runs/digits-2step/student --timesteps 500 --label "its first step" ...
    python benchmarks/fid_noise.py --model runs/digits-2step/student --renoise ddim ...   # deterministic chain
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from fastgen.benchmarking import Results, builtin_pipeline, parse_options, portable
from fastgen.metrics import evaluate_pipeline
from fastgen.training.students import check_renoise

FIRST_SEED = 100_000  # disjoint from the benchmark's seeds (0...) and the search's (10,000...)


@dataclass
class FidNoise:
    """FID sampling noise on the built-in digits model: one solver configuration, disjoint seed sets."""

    solver: str = field(default="unipc", metadata={"help": "any solver= value the pipeline accepts"})
    nfe: int = 6
    samples: int = 2000
    sets: int = field(default=4, metadata={"help": "disjoint seed sets (>= 2 for a standard deviation)"})
    scale: float = 3.0
    batch_size: int = 500
    model: str = field(default="", metadata={
        "help": "a student pipeline folder or builtin:NAME instead of the teacher (it runs its own steps: "
                "solver, nfe and scale are not used)"})
    label: str = field(default="", metadata={"help": "what the record calls --model (default: its folder's name)"})
    timesteps: str = field(default="", metadata={
        "help": "with --model: another descending step list for the same student weights, comma-separated "
                "(e.g. 500 = a two-step student's first step alone; default: the student's own list)"})
    renoise: str = field(default="", metadata={
        "help": "with --model: fresh or ddim instead of the student's own re-noising between steps"})
    out: str = "benchmarks/results/solvers_fid_noise.json"


def _timesteps(opts: FidNoise) -> list[int]:
    """``--timesteps`` as a list of ints (empty: the student's own), checked before any model is loaded."""
    if not opts.timesteps:
        return []
    if not opts.model:
        raise SystemExit("--timesteps applies to a student (--model); the teacher's steps are --solver and --nfe.")
    try:
        return [int(t) for t in opts.timesteps.split(",")]
    except ValueError:
        raise SystemExit(f"--timesteps must be comma-separated integers (e.g. 500,20), got {opts.timesteps!r}.")


def main(argv=None) -> None:
    opts = parse_options(FidNoise, argv)
    timesteps = _timesteps(opts)
    if opts.renoise:
        if not opts.model:
            raise SystemExit("--renoise applies to a student (--model); the teacher's steps are --solver and --nfe.")
        try:
            check_renoise(opts.renoise)
        except ValueError as err:
            raise SystemExit(f"--{err}") from None
    pipe = builtin_pipeline(opts.model or "digits", threads=1)
    if opts.model:
        what = {"model": opts.label or (opts.model if opts.model.startswith("builtin:") else portable(opts.model))}
        sampling = {}
        if timesteps:
            what["timesteps"] = timesteps
            sampling = {"timesteps": timesteps}
        if opts.renoise:
            what["renoise"] = opts.renoise
            sampling["renoise"] = opts.renoise
    else:
        what = {"solver": f"{opts.solver}@{opts.nfe}, CFG {opts.scale}"}
        sampling = dict(num_inference_steps=opts.nfe, solver=opts.solver, guidance_scale=opts.scale)
    config = {**what, "samples": opts.samples, "seeds": f"set k: {FIRST_SEED} + k * samples ...",
              "hardware": "CPU, x86-64, 1 torch thread"}
    results = Results(opts.out, config, resume_on=(*what, "samples"))

    def measure(k: int) -> dict:
        res = evaluate_pipeline(pipe, opts.samples, seed=FIRST_SEED + k * opts.samples, batch_size=opts.batch_size,
                                knn_metrics=False, progress=False, **sampling)
        return {"fid": res.fid, "roughness": res.roughness, "accuracy": res.accuracy,
                "seconds": round(res.wall_seconds, 1)}

    def summary(data: dict) -> None:
        values = [c["fid"] for c in data["cells"]]
        data.update(mean=statistics.mean(values), std=statistics.stdev(values) if len(values) > 1 else None)
        grain = [c["roughness"] for c in data["cells"] if c.get("roughness") is not None]
        if grain:
            data.update(roughness_mean=statistics.mean(grain))

    results.run(range(opts.sets), key=lambda k: {"set": k}, measure=measure, after=summary)


if __name__ == "__main__":
    main()
