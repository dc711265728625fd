"""Prophet benchmark: accuracy vs forward passes, stock BlockRefinementScheduler vs ProphetScheduler, side by side.

The options and the run are ``fastgen eval prophet``'s (:class:`fastgen.prophet.benchmark.ProphetBenchmarkConfig`,
:func:`fastgen.prophet.benchmark.eval_prophet`: 500 held-out problems of the built-in arith-dlm task, 3 step budgets,
same seeds); only the default output differs: the committed benchmarks/results/prophet.json and prophet.png, which
are replaced with ``--overwrite`` only (``--resume`` continues an interrupted run). One torch thread, as measured.

    HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/prophet.py --overwrite
"""
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fastgen.benchmarking import parse_options
from fastgen.prophet.benchmark import ProphetBenchmarkConfig, eval_prophet, summary_lines
from fastgen.runtime import set_num_threads

RESULT = Path(__file__).resolve().parent / "results" / "prophet.json"


@dataclass
class ProphetBenchmark(ProphetBenchmarkConfig):
    """Stock BlockRefinementScheduler vs ProphetScheduler on held-out arith-dlm problems: accuracy vs forward passes."""

    out: str = field(default=str(RESULT), metadata={"help": "result JSON (the plot goes next to it as .png)"})


def main(argv=None) -> None:
    config = parse_options(ProphetBenchmark, argv)
    set_num_threads(1)
    try:
        result = eval_prophet(config, progress=True)
    except (ValueError, OSError) as err:  # bad options or an existing result file: one line, exit code 2
        print(f"benchmarks/prophet.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print("\n".join(summary_lines(result)))


if __name__ == "__main__":
    main()
