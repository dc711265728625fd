"""The ``fastgen`` command: help on every subcommand, sampling, JSON records, argument errors."""
import json
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest
from diffusers import DPMSolverMultistepScheduler

from fastgen import FastGenClassPipeline
from fastgen.cli import build_parser, main
from tiny import tiny_class_unet


def _subcommands(parser, prefix=()):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield prefix + (name,)
                yield from _subcommands(sub, prefix + (name,))


@pytest.mark.parametrize("command", [(), *sorted(set(_subcommands(build_parser())))])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: fastgen" in capsys.readouterr().out


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cls") / "pipe"
    FastGenClassPipeline(scheduler=DPMSolverMultistepScheduler(), unet=tiny_class_unet(num_classes=3),
                         id2label={0: "zero", 1: "one", 2: "two"}).save_pretrained(folder)
    return folder


def test_sample_json_record_and_grid(class_folder, tmp_path, capsys):
    out = tmp_path / "grid.png"
    code = main(["sample", "--model", str(class_folder), "--steps", "3", "--count", "2", "--scale", "2",
                 "--output", str(out), "--json"])
    assert code == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["nfe"] == 6 and record["images"] == 6 and record["output"] == str(out)
    grid = PIL.Image.open(out)
    assert grid.width > 3 * 64 and 2 * 64 < grid.height < 3 * 64  # a column per class, a row per repeat


def test_sample_without_guidance_counts_one_eval_per_step(class_folder, tmp_path, capsys):
    assert main(["sample", "--model", str(class_folder), "--steps", "4", "--count", "1", "--guidance", "none",
                 "--solver", "ddim", "--output", str(tmp_path / "g.png"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["nfe"] == 4


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--guidance", "magic"], "--guidance must be one of"),
    (["--solver", "rk4"], "--solver must be one of"),
    (["--classes", "7"], r"--classes must be in \[0, 3\)"),
    (["--output", "grid.jpg"], "--output must be a .png path"),
    (["--prompt", "a cat"], "--prompt is for text-to-image models"),
])
def test_sample_bad_arguments(class_folder, tmp_path, args, message, capsys):
    assert main(["sample", "--model", str(class_folder), "--output", str(tmp_path / "x.png"), *args]
                if "--output" not in args else ["sample", "--model", str(class_folder), *args]) == 2
    err = capsys.readouterr().err
    assert "error:" in err
    import re
    assert re.search(message, err)


def test_sample_missing_model_folder(tmp_path, capsys):
    assert main(["sample", "--model", str(tmp_path / "nope")]) == 2
    assert "model_index.json" in capsys.readouterr().err


def test_console_script_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "fastgen.cli", "--help"], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0 and "sample" in proc.stdout


def test_sample_accepts_usf_presets_and_teleport(class_folder, tmp_path, capsys):
    import torch

    from fastgen.teleport import GaussianStats

    stats = GaussianStats.from_samples(torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    stats.save(tmp_path / "stats.safetensors")
    assert main(["sample", "--model", str(class_folder), "--steps", "5", "--count", "1", "--solver", "usf-unipc-bh2-2p",
                 "--teleport", str(tmp_path / "stats.safetensors"), "--teleport-fraction", "0.4",
                 "--output", str(tmp_path / "t.png"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["nfe"] == 2 * 3  # 2 of 5 steps teleported
    assert main(["sample", "--model", str(class_folder), "--teleport", str(tmp_path / "none.npz"),
                 "--output", str(tmp_path / "u.png")]) == 2
    assert "--teleport must be a statistics file" in capsys.readouterr().err
