"""Prophet benchmark: accuracy vs forward passes, stock BlockRefinementScheduler vs ProphetScheduler, side by side.

Runs ``fastgen eval prophet`` (500 held-out problems of the built-in arith-dlm task, 3 step budgets, same seeds) and
writes benchmarks/results/prophet.json and prophet.png. Extra arguments are passed through (see ``--help``).

    PYTHONPATH=. python benchmarks/prophet.py
"""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from fastgen.cli import main  # noqa: E402

if __name__ == "__main__":
    torch.set_num_threads(1)
    results = ROOT / "benchmarks" / "results"
    sys.exit(main(["eval", "prophet", "--out-json", str(results / "prophet.json"), "--out-png",
                   str(results / "prophet.png"), *sys.argv[1:]]))
