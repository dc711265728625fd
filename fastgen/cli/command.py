"""The pieces every ``fastgen`` command shares: :class:`Command`, the parser, error and output handling."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from typing import Any, Callable

from transformers import HfArgumentParser

# Optional dependencies and the extra that installs each (pyproject.toml [project.optional-dependencies]).
EXTRAS = {"matplotlib": "plot", "sklearn": "train", "torch_fidelity": "inception", "xformers": "gpu", "scipy": "test"}


@dataclass(frozen=True)
class Command:
    """One ``fastgen`` command: its options are the fields of ``config`` (a dataclass), it runs ``run``.

    Args:
        name: ``"sample"``, or ``"eval fid"`` for the subcommand ``fid`` of the group ``eval``.
        config: a dataclass; each field becomes an option (``--batch-size`` and ``--batch_size``), its
            default the option's default, ``field(metadata={"help": ...})`` its help text.
        run: ``config -> record``, a JSON-serialisable dict. It calls the library, which validates.
        help: one line for ``fastgen --help``.
        description: the longer text of ``fastgen NAME --help`` (default: ``help``).
        summary: ``record -> str``, the line printed without ``--json`` (default: ``key=value`` pairs).
        threads: add ``--threads N`` (torch CPU threads; default :func:`fastgen.runtime.default_num_threads`).
            Every sampling, evaluation and training command wants it.
        recipe: add ``--config FILE``: a YAML or JSON recipe whose keys are the config's fields; options given
            on the command line override it (``fastgen distill --config recipe.yaml --max-steps 10``).
    """

    name: str
    config: type
    run: Callable[[Any], dict]
    help: str
    description: str | None = None
    summary: Callable[[dict], str] | None = None
    threads: bool = True
    recipe: bool = False

    def __post_init__(self):
        if not dataclasses.is_dataclass(self.config):
            raise TypeError(f"Command {self.name!r}: config must be a dataclass, got {self.config!r}.")

    def make_config(self, namespace: argparse.Namespace):
        """The config dataclass from parsed options."""
        return self.config(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(self.config) if f.init})


def read_recipe(path, config: type) -> dict:
    """The options of ``config`` in a YAML (``.yaml``/``.yml``) or JSON recipe file; keys are field names
    (``batch_size`` or ``batch-size``). Unknown keys, a missing file or a malformed one are a clear error."""
    from pathlib import Path

    path = Path(path)
    if path.suffix.lower() not in (".yaml", ".yml", ".json"):
        raise ValueError(f"config must be a .yaml, .yml or .json recipe file, got {str(path)!r}.")
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist.")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"config file {str(path)!r} is not valid JSON: {err}.") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"config file {str(path)!r} is not valid YAML: {' '.join(str(err).split())}.") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of option: value, got {type(data).__name__}.")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    names = [f.name for f in dataclasses.fields(config) if f.init]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"config file {str(path)!r} has unknown options {unknown}; accepted: {names}.")
    return data


class UsageError(Exception):
    """A command line argparse rejects (unknown option, missing value): exit code 2."""

    def __init__(self, message: str, parser: argparse.ArgumentParser):
        super().__init__(message)
        self.parser = parser


class Parser(HfArgumentParser):
    """``HfArgumentParser`` whose usage errors raise :class:`UsageError` (so ``--json`` can report them)."""

    def error(self, message):
        raise UsageError(message, self)


def add_common_options(parser: argparse.ArgumentParser, *, threads: bool, recipe: bool = False) -> None:
    """``--json`` on every command, ``--threads`` on the ones that run models (skipped where already defined),
    ``--config`` on the ones that read recipes."""
    if recipe:
        parser.add_argument("--config", default=None, metavar="FILE",
                            help="YAML or JSON recipe whose keys are this command's options; options given on the "
                                 "command line override it")
    if "--json" not in parser._option_string_actions:
        parser.add_argument("--json", action="store_true",
                            help="print one JSON record on stdout (errors too: {\"error\": ..., \"exit_code\": ...})")
    if threads and "--threads" not in parser._option_string_actions:
        from ..runtime import default_num_threads

        parser.add_argument("--threads", type=int, default=None, dest="threads",
                            help=f"torch CPU threads; 0 = torch's default (every core) (default: min(4, cores // 2) "
                                 f"= {default_num_threads()} here, which avoids oversubscription)")
        parser.set_defaults(_fastgen_threads=True)


_FOLLOWERS = ("must", "needs", "is", "are", "applies", "requires", "cannot", "should", "has")


def option_message(message: str, options: set[str]) -> str:
    """Spell a library message's leading argument name as its option: ``nfe must ...`` -> ``--nfe must ...``.

    Only when the name is one of ``options`` (the command's config fields) and is the subject of the
    sentence (followed by a verb such as "must" or by the quoted value), so the library's messages, which
    name its arguments, name the command's options too."""
    head, sep, rest = message.partition(" ")
    if sep and head in options and (rest.split(" ", 1)[0] in _FOLLOWERS or rest[:1] in "'\""):
        return f"--{head.replace('_', '-')} {rest}"
    return message


def extra_hint(err: ModuleNotFoundError) -> str | None:
    """``pip install 'fastgen[EXTRA]'`` advice when ``err`` is a missing optional dependency."""
    top = (err.name or "").split(".")[0]
    if top in EXTRAS:
        return (f"this needs the optional dependency {top!r}: pip install 'fastgen[{EXTRAS[top]}]'")
    return None


def report_error(command: str, message: str, *, as_json: bool, exit_code: int, kind: str) -> int:
    """One line on stderr (``fastgen CMD: error: ...``), or one JSON record on stdout with ``--json``."""
    message = " ".join(str(message).split()) or kind
    if as_json:
        print(json.dumps({"command": command, "error": message, "type": kind, "exit_code": exit_code}))
    else:
        print(f"fastgen {command}: error: {message}".replace("fastgen : ", "fastgen: "), file=sys.stderr)
    return exit_code


def default_summary(record: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in record.items())


def print_record(command: Command, record: dict, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(record))
    else:
        print((command.summary or default_summary)(record))
