"""Prophet benchmark: accuracy vs forward passes, stock BlockRefinementScheduler vs ProphetScheduler, side by side.

The options and the run are ``fastgen eval prophet``'s (:class:`fastgen.prophet.benchmark.ProphetBenchmarkConfig`,
:func:`fastgen.prophet.benchmark.eval_prophet`: 500 held-out problems of the built-in arith-dlm task, 3 step budgets,
same seeds, two baselines: the stock scheduler and the fair one without its wasted post-block forward); only the
default output differs: the committed benchmarks/results/prophet.json and prophet.png, which are replaced with
``--overwrite`` only (``--resume`` continues an interrupted run, or adds methods/budgets). One torch thread, as
measured.

**Wall time** (``--time_problems N``, 0 = off): after the cells, the ``--time_methods`` decode the first N problems at
``--time_steps`` steps per block side by side in one process (interleaved, ``--time_repeats`` passes, median;
:func:`fastgen.prophet.benchmark.interleaved_wall_time`); the rows go into the JSON as ``wall_time``.

    HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/prophet.py --overwrite
    HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/prophet.py --resume --time_problems 100
"""
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fastgen.benchmarking import parse_options, write_json
from fastgen.prophet.benchmark import ProphetBenchmarkConfig, eval_prophet, interleaved_wall_time, summary_lines
from fastgen.runtime import set_num_threads

RESULT = Path(__file__).resolve().parent / "results" / "prophet.json"


@dataclass
class ProphetBenchmark(ProphetBenchmarkConfig):
    """Stock BlockRefinementScheduler vs ProphetScheduler on held-out arith-dlm problems: accuracy vs forward passes."""

    out: str = field(default=str(RESULT), metadata={"help": "result JSON (the plot goes next to it as .png)"})
    time_problems: int = field(default=0, metadata={"help": "problems of the interleaved wall-time run (0: none)"})
    time_steps: int = field(default=4, metadata={"help": "steps per block of the wall-time run"})
    time_methods: list[str] = field(default_factory=lambda: ["baseline", "baseline-fair", "prophet"])
    time_repeats: int = field(default=3, metadata={"help": "interleaved passes of the wall-time run (median)"})


def main(argv=None) -> None:
    opts = parse_options(ProphetBenchmark, argv)
    timing = {k: getattr(opts, k) for k in ("time_problems", "time_steps", "time_methods", "time_repeats")}
    config = ProphetBenchmarkConfig(**{k: v for k, v in vars(opts).items() if k not in timing})
    set_num_threads(1)
    try:
        result = eval_prophet(config, progress=True)
        if opts.time_problems > 0:
            rows = interleaved_wall_time(config, steps=opts.time_steps, methods=opts.time_methods,
                                         n=opts.time_problems, repeats=opts.time_repeats)
            data = json.loads(Path(result["out"]).read_text())
            data["wall_time"] = rows
            write_json(result["out"], data)
            print("\n".join(f"wall time {r['method']:>14} at {r['steps_per_block']} steps/block: "
                            f"{r['ms_per_problem']:.1f} ms/problem" for r in rows))
    except (ValueError, OSError) as err:  # bad options or an existing result file: one line, exit code 2
        print(f"benchmarks/prophet.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print("\n".join(summary_lines(result)))


if __name__ == "__main__":
    main()
