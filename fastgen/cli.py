"""The ``fastgen`` command line. Each feature module registers its own subcommands."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# Modules that contribute subcommands: each has ``register(subparsers)`` and may have
# ``register_eval(eval_subparsers)`` for ``fastgen eval <name>``.
_COMMAND_MODULES = [
    "fastgen.cli_sample",
    "fastgen.cli_text",
    "fastgen.cli_eval",
    "fastgen.cli_guidance",
    "fastgen.cli_solvers",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastgen",
        description="fastgen: faster, better diffusion sampling for diffusers pipelines.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    eval_parser = sub.add_parser("eval", help="evaluation commands (FID, reference statistics, Prophet benchmark)")
    eval_sub = eval_parser.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND")
    eval_sub.required = True
    for module_name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:  # a feature module not present in this build
            if err.name == module_name:
                continue
            raise
        module.register(sub)
        if hasattr(module, "register_eval"):
            module.register_eval(eval_sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # transformers notes at import that optional torchvision is absent (it falls back to PIL); keep the CLI quiet.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"fastgen {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
