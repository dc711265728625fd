"""The ``fastgen`` command line: one small module per command, options from dataclass configs.

Every command is a :class:`~fastgen.cli.command.Command`: a name, a dataclass whose fields are the
options (parsed by ``transformers.HfArgumentParser``, so recipe files and benchmarks build the same
config with the same defaults), and a ``run(config) -> dict`` that calls the library. The library
validates (one message, one place); a CLI module holds no checks and no library logic. This package
adds to every command ``--json`` (the record, or the error, as one JSON line on stdout) and, to
commands that run models, ``--threads N``; it turns library errors (``ValueError``, ``TypeError``,
``OSError``, fastgen's own exceptions) into one line and exit code 2, a missing optional dependency
into one line naming the extra to install, and Ctrl-C into one line and exit code 130.

Adding a command (the pattern every module here follows)::

    # fastgen/cli/mycommand.py
    from dataclasses import dataclass, field
    from fastgen.cli.command import Command

    @dataclass
    class MyConfig:            # better: defined in the library module that runs it, next to its function
        steps: int = field(default=20, metadata={"help": "solver steps"})

    def run(config: MyConfig) -> dict:
        from fastgen.mymodule import do_it          # heavy imports inside run: `fastgen --help` stays fast
        return do_it(config)                        # a JSON-serialisable record

    COMMANDS = [Command("my-command", MyConfig, run, help="one line for `fastgen --help`",
                        summary=lambda r: f"wrote {r['output']}")]

then add ``"mycommand"`` to :data:`COMMAND_MODULES`. Keep the config's module free of heavy top-level
imports (torch, diffusers): every command module is imported to build the parser, and ``fastgen --help``
imports neither (a test checks that). A name with a space is a subcommand of a group:
``Command("eval fid", ...)`` in ``fastgen/cli/eval.py`` and ``Command("eval prophet", ...)`` in
``fastgen/cli/text.py`` both land under ``fastgen eval``; the group is created by whichever module
comes first (help text of groups: :data:`GROUP_HELP`). A module listed here but absent from the tree
is skipped, so ``eval``, ``text`` and ``distill`` can land in any order. ``Command(..., recipe=True)``
adds ``--config FILE``: a YAML/JSON recipe with the config's fields as keys, overridden by the options
given on the command line (what ``fastgen distill --config recipe.yaml`` uses).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys

# transformers notes at import that optional torchvision is absent (it falls back to PIL); keep the CLI quiet.
# Set before anything imports transformers (command.py does, for HfArgumentParser).
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from .command import (Command, Parser, UsageError, add_common_options, extra_hint,  # noqa: E402
                      option_message, print_record, report_error)

# Command modules under fastgen/cli/, in the order of `fastgen --help`; each defines COMMANDS: list[Command].
COMMAND_MODULES = ["sample", "search", "teleport", "linear_ag", "eval", "text", "distill"]
GROUP_HELP = {"eval": "evaluation commands (FID, reference statistics, Prophet benchmark)"}


def _version() -> str:
    from .. import __version__

    return __version__


def _import_optional(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:  # a command module not (yet) in this tree
        if err.name == name:
            return None
        raise


class _Builder:
    """Builds the parser tree: top-level commands and groups (``eval``) created on first use."""

    def __init__(self):
        self.parser = Parser(prog="fastgen",
                             description="fastgen: faster, better diffusion sampling for diffusers pipelines.")
        self.parser.add_argument("--version", action="version", version=f"fastgen {_version()}")
        self.sub = self.parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
        self.sub.required = True
        self.groups: dict[str, argparse._SubParsersAction] = {}
        self.commands: dict[str, tuple[argparse.ArgumentParser, Command]] = {}

    def group(self, name: str):
        if name not in self.groups and name in self.commands:  # a command with subcommands of its own
            self.groups[name] = self.commands[name][0].add_subparsers(  # (``distill`` + ``distill collect-trajectories``)
                dest=f"{name}_command", metavar=f"{name.upper()}_COMMAND", parser_class=Parser)
        if name not in self.groups:
            parser = self.sub.add_parser(name, help=GROUP_HELP.get(name, f"{name} commands"),
                                         description=GROUP_HELP.get(name))
            self.groups[name] = parser.add_subparsers(dest=f"{name}_command", metavar=f"{name.upper()}_COMMAND",
                                                      parser_class=Parser)
            self.groups[name].required = True
        return self.groups[name]

    def add(self, command: Command) -> None:
        *group, leaf = command.name.split(" ")
        if len(group) > 1:
            raise ValueError(f"command names have at most one group, got {command.name!r}.")
        sub = self.group(group[0]) if group else self.sub
        parser = sub.add_parser(leaf, help=command.help, description=command.description or command.help,
                                dataclass_types=[command.config])
        add_common_options(parser, threads=command.threads, recipe=command.recipe)
        parser.set_defaults(_command=command)
        self.commands[command.name] = (parser, command)

    def apply_recipe(self, argv: list[str]) -> None:
        """With ``--config FILE`` on a recipe command, the file's values become that command's defaults."""
        path = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"), None)
        path = path or next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
        words = [a for a in argv[:2] if not a.startswith("-")]
        target = self.commands.get(" ".join(words)) or self.commands.get(" ".join(words[:1]))
        if path is None or target is None or not target[1].recipe:
            return
        from .command import read_recipe

        parser, command = target
        values = read_recipe(path, command.config)
        parser.set_defaults(**values)
        for action in parser._actions:
            if action.dest in values:
                action.required = False


def build_parser() -> argparse.ArgumentParser:
    """The full ``fastgen`` parser (every command module present in this tree)."""
    return _build().parser


def _build() -> _Builder:
    builder = _Builder()
    for name in COMMAND_MODULES:
        module = _import_optional(f"{__name__}.{name}")
        if module is not None:
            for command in module.COMMANDS:
                builder.add(command)
    return builder


def _command_name(ns: argparse.Namespace) -> str:
    parts = [ns.command] if getattr(ns, "command", None) else []
    sub = getattr(ns, f"{ns.command}_command", None) if parts else None
    return " ".join(parts + ([sub] if sub else []))


def main(argv: list[str] | None = None) -> int:
    """Run ``fastgen`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in argv
    name, command = " ".join(a for a in argv[:2] if not a.startswith("-")), None
    try:
        try:
            builder = _build()
            builder.apply_recipe(argv)
            ns = builder.parser.parse_args(argv)
        except UsageError as err:
            name = err.parser.prog.removeprefix("fastgen").strip() or " ".join(
                a for a in argv[:2] if not a.startswith("-"))
            if not as_json:
                err.parser.print_usage(sys.stderr)
            return report_error(name, str(err), as_json=as_json, exit_code=2, kind="UsageError")
        name, command = _command_name(ns), getattr(ns, "_command", None)
        as_json = bool(getattr(ns, "json", False))
        if getattr(ns, "_fastgen_threads", False):
            from ..runtime import set_num_threads

            set_num_threads(ns.threads)
        with _quiet_loading():
            record = command.run(command.make_config(ns))
        print_record(command, record, as_json=as_json)
        return 0
    except KeyboardInterrupt:
        return report_error(name, "interrupted (Ctrl-C); partial results, if any, are kept", as_json=as_json,
                            exit_code=130, kind="KeyboardInterrupt")
    except ModuleNotFoundError as err:
        hint = extra_hint(err)
        if hint is None:
            raise
        return report_error(name, hint, as_json=as_json, exit_code=2, kind="ModuleNotFoundError")
    except Exception as err:  # noqa: BLE001 - library errors become one line; anything else is a bug: traceback
        if not _is_user_error(err):
            raise
        names = {"threads"} | ({f for f in command.config.__dataclass_fields__} if command else set())
        return report_error(name, option_message(str(err), names), as_json=as_json, exit_code=2,
                            kind=type(err).__name__)


@contextlib.contextmanager
def _quiet_loading():
    """No "Loading pipeline components" bar from diffusers (the built-in models load in a fraction of a
    second); sampling and evaluation keep their progress bars."""
    from diffusers.utils import logging as diffusers_logging

    enabled = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            diffusers_logging.enable_progress_bar()


def _is_user_error(err: Exception) -> bool:
    """Errors the library raises for bad input: ValueError, TypeError, OSError and fastgen's own exceptions."""
    return isinstance(err, (ValueError, TypeError, OSError)) or type(err).__module__.split(".")[0] == "fastgen"


__all__ = ["Command", "COMMAND_MODULES", "GROUP_HELP", "build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
