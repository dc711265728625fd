"""``python -m fastgen.distill``: distil a diffusion teacher into a one- or few-step student.

Run it directly or under accelerate (multi-GPU DDP/FSDP; see ``distill/accelerate-*.yaml``)::

    python -m fastgen.distill --config distill/digits-dmd2.yaml --output_dir runs/digits-dmd2
    accelerate launch -m fastgen.distill --config distill/sd15-dmd2.yaml --teacher PATH

Options are the fields of :class:`fastgen.training.config.DistillConfig` (``--help`` lists them);
command-line flags override the recipe given with ``--config``. ``--validate_only`` checks the
configuration (and the teacher/dataset paths) without loading a model; ``--json`` prints the run
summary as one JSON line. This module only parses options; the work is in :mod:`fastgen.training`.
"""
from __future__ import annotations

import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from .training.config import launch_state, parse_config, validate_for_launch

    try:
        config, extras = parse_config(argv)
        validate_for_launch(config)
        if extras["print_config"] or extras["validate_only"]:
            if launch_state().is_main_process:
                print(json.dumps(config.to_dict(), sort_keys=True) if extras["json"] or extras["print_config"]
                      else f"fastgen distill: configuration valid ({config.method}, teacher {config.teacher}).")
            if extras["validate_only"]:
                return 0
        from .training.trainer import run_distillation

        summary = run_distillation(config)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"fastgen distill: error: {err}", file=sys.stderr)
        return 2
    if launch_state().is_main_process:
        if extras["json"]:
            print(json.dumps(summary, sort_keys=True, default=str))
        else:
            print(f"fastgen distill: {summary['step']} generator steps; student saved in {summary['student']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
