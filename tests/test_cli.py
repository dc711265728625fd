"""The ``fastgen`` command: help on every command and option, --version, --json records and errors,
Ctrl-C, library errors as one line, --threads, every solver form, the registration pattern."""
import dataclasses
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

import fastgen
from fastgen import FastGenClassPipeline
from fastgen.cli import build_parser, main
from fastgen.cli.command import Command
from tiny import tiny_class_unet

ROOT = Path(__file__).resolve().parents[1]


def _subcommands(parser, prefix=()):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield prefix + (name,), sub
                yield from _subcommands(sub, prefix + (name,))


COMMANDS = dict(_subcommands(build_parser()))


@pytest.mark.parametrize("command", [(), *sorted(COMMANDS)])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: fastgen" in capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(c for c, p in COMMANDS.items() if not any(
    a.__class__.__name__ == "_SubParsersAction" for a in p._actions)))
def test_every_option_has_help_json_and_threads(command):
    parser = COMMANDS[command]
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert parser.get_default("_command") is not None  # every command is a Command (no argparse leftovers)
    assert all(a.help for a in options), [a.option_strings for a in options if not a.help]
    assert "--json" in parser._option_string_actions
    assert "--threads" in parser._option_string_actions  # every command here samples, evaluates or fits


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastgen {fastgen.__version__}"


def test_console_script_entry_point_runs_and_help_stays_light():
    """``python -m fastgen.cli --help`` works, and building the parser imports neither torch nor diffusers
    (configs live in modules without heavy top-level imports; commands import the library when they run)."""
    code = ("import runpy, sys\ntry:\n    runpy.run_module('fastgen.cli', run_name='__main__')\nexcept SystemExit as e:\n"
            "    print('exit', e.code, 'torch' in sys.modules, 'diffusers' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert "sample" in proc.stdout and "eval" in proc.stdout, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "exit 0 False False"


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cls") / "pipe"
    FastGenClassPipeline(scheduler=DPMSolverMultistepScheduler(), unet=tiny_class_unet(num_classes=3),
                         id2label={0: "zero", 1: "one", 2: "two"}).save_pretrained(folder)
    return folder


def _record(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_sample_json_record_and_grid(class_folder, tmp_path, capsys):
    out = tmp_path / "grid.png"
    code = main(["sample", "--model", str(class_folder), "--steps", "3", "--count", "2", "--scale", "2",
                 "--output", str(out), "--json", "--threads", "1"])
    assert code == 0
    record = _record(capsys)
    assert record["nfe"] == 6 and record["images"] == 6 and record["output"] == str(out)
    assert record["threads"] == 1 and record["solver"] == "DPMSolverMultistepScheduler"
    grid = PIL.Image.open(out)
    # a column per class, a row per repeat (64 px + caption), a title of at most 3 lines
    assert 3 * 64 < grid.width < 4 * 64 and 2 * 64 < grid.height < 2 * (64 + 14) + 3 * 12 + 8


def test_sample_grid_does_not_depend_on_batch_size(class_folder, tmp_path):
    """Image i uses seed + i whatever batch it ran in."""
    for batch in (64, 4):
        assert main(["sample", "--model", str(class_folder), "--steps", "2", "--count", "2", "--batch-size", str(batch),
                     "--output", str(tmp_path / f"b{batch}.png")]) == 0
    assert (tmp_path / "b64.png").read_bytes() == (tmp_path / "b4.png").read_bytes()


def test_sample_without_guidance_counts_one_eval_per_step(class_folder, tmp_path, capsys):
    assert main(["sample", "--model", str(class_folder), "--steps", "4", "--count", "1", "--guidance", "none",
                 "--solver", "ddim", "--output", str(tmp_path / "g.png"), "--json"]) == 0
    assert _record(capsys)["nfe"] == 4


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], r"^fastgen sample: error: --steps must be a positive integer, got 0\.$"),
    (["--count", "-1"], r"--count must be a positive integer"),
    (["--guidance", "magic"], r"--guidance must be None, one of \['cfg'"),
    (["--solver", "rk4"], r"--solver must be None .*usf-default.*got 'rk4'"),
    (["--classes", "7"], r"class ids in \[0, 3\), got 7"),
    (["--output", "grid.jpg"], r"--output must be a \.png path"),
    (["--prompt", "a cat"], r"--prompt is for text-to-image models"),
    (["--teleport-fraction", "0.3"], r"--teleport-fraction needs teleport"),
    (["--scale", "nan"], r"--guidance-scale must be a finite number >= 0"),
    (["--guidance-scale", "-5"], r"--guidance-scale must be a finite number >= 0 \(1 = no guidance\), got -5\.0"),
    (["--device", "cuda:7"], r"--device 'cuda:7' is not available"),
    (["--threads", "-2"], r"--threads must be an integer >= 0"),
    (["--attention", "flash"], r"attention must be one of"),
])
def test_sample_bad_arguments_one_line(class_folder, tmp_path, args, message, capsys):
    argv = ["sample", "--model", str(class_folder), *args]
    if "--output" not in args:
        argv += ["--output", str(tmp_path / "x.png")]
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(message, err), err
    assert captured.out == "" and not (tmp_path / "x.png").exists()


def test_sample_missing_model_folder(tmp_path, capsys):
    assert main(["sample", "--model", str(tmp_path / "nope")]) == 2
    assert "model_index.json" in capsys.readouterr().err


def test_errors_as_json(class_folder, tmp_path, capsys):
    assert main(["sample", "--model", str(class_folder), "--steps", "0", "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.err == ""
    record = json.loads(captured.out)
    assert record == {"command": "sample", "error": "--steps must be a positive integer, got 0.", "type": "ValueError",
                      "exit_code": 2}
    # usage errors (argparse) too, with the command named
    assert main(["sample", "--bogus", "1", "--json"]) == 2
    record = json.loads(capsys.readouterr().out)
    assert record["command"] == "sample" and "--bogus" in record["error"] and record["exit_code"] == 2
    assert main(["eval", "fid", "--json"]) == 2  # --fake is required
    assert json.loads(capsys.readouterr().out)["command"] == "eval fid"


def test_usage_error_without_json_prints_usage_and_exits_2(capsys):
    assert main(["sample", "--steps", "many"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: fastgen sample") and "error: argument --steps" in err


@pytest.mark.parametrize("as_json", [False, True])
def test_ctrl_c_one_line_exit_130(monkeypatch, capsys, as_json):
    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr("fastgen.generate.sample_grid", interrupted)
    assert main(["sample", *(["--json"] if as_json else [])]) == 130
    captured = capsys.readouterr()
    if as_json:
        record = json.loads(captured.out)
        assert record["type"] == "KeyboardInterrupt" and record["exit_code"] == 130 and "interrupted" in record["error"]
    else:
        assert captured.err.count("\n") == 1 and captured.err.startswith("fastgen sample: error: interrupted")


def test_missing_optional_dependency_names_the_extra(monkeypatch, capsys):
    def needs_matplotlib(config):
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")

    monkeypatch.setattr("fastgen.generate.sample_grid", needs_matplotlib)
    assert main(["sample"]) == 2
    assert "pip install 'fastgen[plot]'" in capsys.readouterr().err


def test_bugs_keep_their_traceback(monkeypatch):
    """Only bad-input errors become one line; a bug (RuntimeError, a missing required module) is not hidden."""
    def bug(config):
        raise RuntimeError("a bug")

    monkeypatch.setattr("fastgen.generate.sample_grid", bug)
    with pytest.raises(RuntimeError):
        main(["sample"])
    monkeypatch.setattr("fastgen.generate.sample_grid", lambda c: __import__("no_such_module_xyz"))
    with pytest.raises(ModuleNotFoundError):
        main(["sample"])


def test_fastgen_own_exceptions_are_user_errors(monkeypatch, capsys):
    mod = type(sys)("fastgen.fake_errors")
    exec("class FileCorrupt(Exception):\n    pass", mod.__dict__)
    mod.FileCorrupt.__module__ = "fastgen.fake_errors"

    def corrupt(config):
        raise mod.FileCorrupt("model weights file 'x.safetensors' is truncated")

    monkeypatch.setattr("fastgen.generate.sample_grid", corrupt)
    assert main(["sample"]) == 2
    assert capsys.readouterr().err.strip() == "fastgen sample: error: model weights file 'x.safetensors' is truncated"


def test_threads_default_avoids_oversubscription(monkeypatch):
    from fastgen import runtime

    for cores, expected in [(1, 1), (2, 1), (4, 2), (8, 4), (64, 4)]:
        monkeypatch.setattr(runtime, "available_cores", lambda c=cores: c)
        assert runtime.default_num_threads() == expected
    before = torch.get_num_threads()
    try:
        assert runtime.set_num_threads(1) == 1
        assert runtime.set_num_threads(0) == 1  # 0 leaves torch's setting alone
    finally:
        torch.set_num_threads(before)


def test_threads_option_reaches_torch(monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr("fastgen.generate.sample_grid", lambda config: seen.setdefault("threads", torch.get_num_threads())
                        and {"ok": 1})
    before = torch.get_num_threads()
    try:
        assert main(["sample", "--threads", "1", "--json"]) == 0
        assert seen["threads"] == 1
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------ solver: every form the pipelines accept
SCHEDULE = fastgen.builtin_path("digits").parent / "digits-schedules" / "nfe5.json"


@pytest.mark.parametrize("solver, steps", [
    ("dpmsolver++", 5), ("UniPC", 5), ("euler", 5),  # diffusers solver names (case-insensitive, as resolve_solver)
    ("usf-default", 5), ("usf-dpmsolver++-2m", 5),  # USF presets
    ("schedule.json", 4),  # a schedule JSON
])
def test_solver_accepts_every_pipeline_form(class_folder, tmp_path, capsys, solver, steps):
    if solver == "schedule.json":
        from fastgen.solvers import preset_schedule

        solver = str(tmp_path / solver)
        preset_schedule("usf-unipc-bh2-2p", 4, DPMSolverMultistepScheduler().config).save(solver)
    assert main(["sample", "--model", str(class_folder), "--steps", str(steps), "--count", "1", "--solver", solver,
                 "--output", str(tmp_path / "s.png"), "--json"]) == 0
    assert _record(capsys)["solver"] == solver


def test_solver_accepts_the_shipped_s3_schedule(tmp_path, capsys):
    """The README's headline S³ schedule (average_x0 first step: needs the digits model) from its path."""
    assert main(["sample", "--classes", "3", "--count", "2", "--steps", "5", "--solver", str(SCHEDULE),
                 "--output", str(tmp_path / "s3.png"), "--json"]) == 0
    assert _record(capsys)["nfe"] == 10


def test_no_command_validates_solver_itself():
    """Every command's ``solver`` option is a free string: the library (resolve_solver) is the one validator."""
    for command, parser in COMMANDS.items():
        action = parser._option_string_actions.get("--solver")
        if action is not None:
            assert action.choices is None and action.type in (None, str), command


def test_sample_accepts_teleport(class_folder, tmp_path, capsys):
    from fastgen.teleport import GaussianStats

    stats = GaussianStats.from_samples(torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    stats.save(tmp_path / "stats.safetensors")
    assert main(["sample", "--model", str(class_folder), "--steps", "5", "--count", "1", "--solver", "usf-unipc-bh2-2p",
                 "--teleport", str(tmp_path / "stats.safetensors"), "--teleport-fraction", "0.4",
                 "--output", str(tmp_path / "t.png"), "--json"]) == 0
    assert _record(capsys)["nfe"] == 2 * 3  # 2 of 5 steps teleported
    assert main(["sample", "--model", str(class_folder), "--teleport", str(tmp_path / "none.npz"),
                 "--output", str(tmp_path / "u.png")]) == 2
    assert "none.npz" in capsys.readouterr().err and not (tmp_path / "u.png").exists()


# ------------------------------------------------------------------ the registration pattern
@dataclass
class _ToyConfig:
    steps: int = field(default=3, metadata={"help": "steps"})
    names: list[str] = field(default_factory=lambda: ["a"], metadata={"help": "names"})


def _toy_run(config):
    if config.steps < 1:
        raise ValueError(f"steps must be >= 1, got {config.steps}.")
    return {"steps": config.steps, "names": config.names}


def test_commands_register_into_groups(monkeypatch, capsys):
    import fastgen.cli as cli

    toy = type(sys)("fastgen.cli.toy")
    toy.COMMANDS = [Command("eval toy", _ToyConfig, _toy_run, help="a toy evaluation", threads=False),
                    Command("toy", _ToyConfig, _toy_run, help="a toy command", summary=lambda r: f"ran {r['steps']}")]
    monkeypatch.setitem(sys.modules, "fastgen.cli.toy", toy)
    monkeypatch.setattr(cli, "COMMAND_MODULES", [*cli.COMMAND_MODULES, "toy", "not_there_yet"])
    assert main(["eval", "toy", "--steps", "5", "--names", "x", "y", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"steps": 5, "names": ["x", "y"]}
    assert main(["toy"]) == 0 and capsys.readouterr().out.strip() == "ran 3"
    assert main(["toy", "--steps", "0"]) == 2
    assert capsys.readouterr().err.strip() == "fastgen toy: error: --steps must be >= 1, got 0."
    parser = dict(_subcommands(cli.build_parser()))
    assert ("eval", "fid") in parser and ("eval", "toy") in parser  # one group, several modules
    assert "--threads" not in parser[("eval", "toy")]._option_string_actions
    with pytest.raises(TypeError):
        Command("bad", dict, _toy_run, help="config must be a dataclass")


@dataclass
class _RecipeConfig:
    output_dir: str = field(metadata={"help": "required: where to write"})
    max_steps: int = field(default=10, metadata={"help": "steps"})
    learning_rate: float = field(default=1e-4, metadata={"help": "lr"})


def test_recipe_files_give_defaults_and_the_command_line_overrides(monkeypatch, tmp_path, capsys):
    import fastgen.cli as cli

    mod = type(sys)("fastgen.cli.recipe_toy")
    mod.COMMANDS = [Command("train-toy", _RecipeConfig, lambda c: dataclasses.asdict(c), help="toy", recipe=True)]
    monkeypatch.setitem(sys.modules, "fastgen.cli.recipe_toy", mod)
    monkeypatch.setattr(cli, "COMMAND_MODULES", [*cli.COMMAND_MODULES, "recipe_toy"])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("output_dir: runs/a\nmax-steps: 50\n")
    assert main(["train-toy", "--config", str(recipe), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"output_dir": "runs/a", "max_steps": 50, "learning_rate": 1e-4}
    assert main(["train-toy", "--config", str(recipe), "--max_steps", "7", "--learning-rate", "0.5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"output_dir": "runs/a", "max_steps": 7, "learning_rate": 0.5}
    (tmp_path / "r.json").write_text(json.dumps({"output_dir": "b"}))
    assert main(["train-toy", "--config", str(tmp_path / "r.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["output_dir"] == "b"
    assert main(["train-toy", "--json"]) == 2  # output_dir is required without a recipe
    assert "output_dir" in json.loads(capsys.readouterr().out)["error"]
    recipe.write_text("output_dir: a\nmax_stesp: 5\n")
    assert main(["train-toy", "--config", str(recipe)]) == 2
    assert "unknown options ['max_stesp']" in capsys.readouterr().err
    recipe.write_text("output_dir: [a\n")
    assert main(["train-toy", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "is not valid YAML" in err and len(err.strip().splitlines()) == 1
    assert main(["train-toy", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml' does not exist" in capsys.readouterr().err


def test_configs_are_the_library_defaults():
    """The CLI's defaults are the library configs' (one source of options for CLI, recipes and benchmarks)."""
    from fastgen.generate import SampleConfig

    parser = COMMANDS[("sample",)]
    for f in dataclasses.fields(SampleConfig):
        assert parser.get_default(f.name) == f.default, f.name
        assert f.metadata.get("help"), f.name


# ------------------------------------------------------------------ grid legibility
def test_grid_labels_every_row_and_never_clips_the_title():
    import numpy as np
    import PIL.ImageFont

    from fastgen.grid import LINE_HEIGHT, image_grid, wrap_text

    title = "digits | usf-default | 20 steps | cfg 3 | NFE 40/img | " + "long-solver-name " * 6
    white = [np.ones((8, 8, 1))] * 4
    grid = image_grid(white, ncols=2, captions=["zero", "one", "zero", "one"], title=title, cell_size=32)
    font = PIL.ImageFont.load_default()
    lines = wrap_text(title, grid.width - 8, font)
    assert len(lines) > 2 and all(font.getlength(line.removesuffix(" |")) <= grid.width - 8 for line in lines)
    assert "".join(lines).replace(" ", "") == title.replace(" ", "")  # nothing dropped
    top = LINE_HEIGHT * len(lines) + 4
    assert grid.height == top + 2 * (32 + LINE_HEIGHT + 2) + 2
    gray = np.asarray(grid.convert("L"))
    for row in range(2):  # a caption (dark text on white) under each image of every row
        y = top + 2 + row * (32 + LINE_HEIGHT + 2) + 32
        for col in range(2):
            x = 2 + col * (32 + 2)
            assert (gray[y:y + LINE_HEIGHT, x:x + 32] < 128).any(), (row, col)
    assert (gray[2:top - 4, :] < 128).any()  # the title is drawn


def test_sample_with_guidance_adapter_runs_one_evaluation_per_step(tmp_path, capsys):
    """``--guidance-adapter builtin:digits-agd``: CFG at --scale for one network evaluation per step (AGD);
    the grid differs from plain CFG's on the same seeds (the adapter, not CFG, guided)."""
    args = ["sample", "--steps", "3", "--count", "1", "--classes", "3", "--scale", "5", "--json"]
    assert main([*args, "--guidance-adapter", "builtin:digits-agd", "--output", str(tmp_path / "a.png")]) == 0
    record = _record(capsys)
    assert record["nfe"] == 3 and record["guidance_adapter"] == "builtin:digits-agd"
    assert main([*args, "--output", str(tmp_path / "c.png")]) == 0
    assert _record(capsys)["nfe"] == 6
    def cell(name):  # the image cell at the bottom of the grid (the titles differ in length)
        grid = PIL.Image.open(tmp_path / name).convert("L")
        return torch.tensor(list(grid.crop((0, grid.height - 80, 64, grid.height)).getdata()), dtype=torch.float32)

    assert 0 < (cell("a.png") - cell("c.png")).abs().mean() < 20  # close to CFG, not equal to it


@pytest.mark.parametrize("model, adapter, message", [
    ("builtin:digits", "builtin:digits", r"guidance_adapter: 'builtin:digits' holds no guidance adapter"),
    ("builtin:digits", "no/such/folder", r"guidance_adapter: 'no/such/folder' holds no guidance adapter"),
    ("builtin:digits-1step", "builtin:digits-agd", r"guidance_adapter: a distilled student runs without guidance"),
])
def test_sample_bad_guidance_adapter_one_line(model, adapter, message, tmp_path, capsys):
    assert main(["sample", "--model", model, "--guidance-adapter", adapter, "--output", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "x.png").exists()
