"""``python -m fastgen.distill``: the ``fastgen distill`` command (:mod:`fastgen.cli.distill`) as a module,
so accelerate can launch it on several processes::

    python -m fastgen.distill --config distill/digits-fdistill-js.yaml --output-dir runs/digits-js
    accelerate launch --config_file distill/accelerate-ddp.yaml -m fastgen.distill --config distill/sd15-dmd2.yaml ...

Only the main process prints the run record; every process reports its own errors.
"""
from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    from .cli import main as cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) != 0:
        with open(os.devnull, "w") as devnull:
            stdout, sys.stdout = sys.stdout, devnull
            try:
                return cli_main(["distill", *argv])
            finally:
                sys.stdout = stdout
    return cli_main(["distill", *argv])


if __name__ == "__main__":
    sys.exit(main())
