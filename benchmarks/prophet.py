"""Prophet benchmark: accuracy vs forward passes, stock BlockRefinementScheduler vs ProphetScheduler, side by side.

``fastgen eval prophet`` (500 held-out problems of the built-in arith-dlm task, 3 step budgets, same seeds) writing
the committed results benchmarks/results/prophet.json and prophet.png (replaced). Extra arguments go to that command
(see ``fastgen eval prophet --help``).

    HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/prophet.py
"""
import sys
from pathlib import Path

from fastgen.cli import main

RESULT = Path(__file__).resolve().parent / "results" / "prophet.json"

if __name__ == "__main__":
    sys.exit(main(["eval", "prophet", "--threads", "1", "--out", str(RESULT), "--overwrite", *sys.argv[1:]]))
