"""Bad inputs (issue 14): every one a clear error before heavy work, nothing the user had changed.

CLI cases run ``fastgen.cli.main`` in-process: exit code 2, ONE stderr line naming the option or file, no
traceback. API cases assert the exception type and that the message names the argument or file. Cases whose
input is invalid up front run with the model loader patched to raise (so "nothing loaded" is checked);
every case hashes every file under tmp_path before and after.
"""
import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import fastgen
import fastgen.builtin
from fastgen import FastGenClassPipeline


class ModelLoaded(Exception):
    """Raised by the patched loader: the command got past its checks and tried to load a model."""


def _hash_tree(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _forbid_loading(monkeypatch):
    def boom(*a, **k):
        raise ModelLoaded("a model was loaded although the input was invalid up front")

    monkeypatch.setattr(fastgen.builtin, "load_builtin", boom)
    monkeypatch.setattr(FastGenClassPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: boom()))


def _forbid_sampling(monkeypatch):
    def boom(*a, **k):
        raise ModelLoaded("sampling started although the input was invalid up front")

    from diffusers import UNet2DModel

    monkeypatch.setattr(UNet2DModel, "forward", boom)


def _digits(tmp: Path) -> Path:
    dst = tmp / "m"
    if not dst.exists():
        shutil.copytree(fastgen.builtin_path("digits"), dst)
    return dst


def _weights(tmp: Path) -> Path:
    return _digits(tmp) / "unet" / "diffusion_pytorch_model.safetensors"


def _truncate(tmp):
    w = _weights(tmp)
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])


def _nan_weights(tmp):
    from safetensors.torch import load_file, save_file

    w = _weights(tmp)
    sd = load_file(w)
    sd = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in sd.items()}
    save_file(sd, w)


def _file(name, data):
    def make(tmp):
        p = tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return make


def _many(*fns):
    def make(tmp):
        for fn in fns:
            fn(tmp)
    return make


NOT_ZIP = _file("stats.npz", b"this is not a zip archive at all")
GARBAGE_TELEPORT = _file("tele.safetensors", b"\x00garbage\xff" * 20)
EXISTING_OUT = _file("out.png", b"my precious image")
BLOCKER = _file("blocker", "a plain file")
BAD_STATE = _file("s.json.state.json", '{"space": {"nfe": 4, "teleport_steps": 0}, "records": [{"schedule": "')
OTHER_STATE = _file("s.json.state.json", json.dumps({"space": {"nfe": 4, "teleport_steps": 0}, "options": {
    "model": "builtin:digits", "metric": "fid", "samples": 20, "reference_steps": 50, "data_mean": "auto",
    "initial": [], "scale": 3.0, "teleport": None, "seed": 0}, "records": []}))
BAD_SCHEDULE = _file("sched.json", "{not json")
RECIPE_BAD = _file("r.yaml", "max_steps: [unclosed")

S = ["sample", "--count", "1", "--steps", "2"]
SS = ["search-schedule", "--budget", "2", "--samples", "20", "--rescore", "1", "--rescore-samples", "20"]

# (id, argv (with {tmp}), setup, upfront (loader forbidden), words the one line must contain)
CLI_CASES = [
    ("sample-scale-nan", S + ["--scale", "nan"], None, True, ["guidance_scale", "nan"]),
    ("sample-scale-inf", S + ["--scale", "inf"], None, True, ["guidance_scale"]),
    ("sample-scale-neg", S + ["--scale", "-5"], None, True, ["guidance_scale", "-5"]),
    ("sample-steps-0", S[:3] + ["--steps", "0"], None, True, ["--steps"]),
    ("sample-steps-neg", S[:3] + ["--steps", "-3"], None, True, ["--steps"]),
    ("sample-steps-word", ["sample", "--steps", "many"], None, True, ["--steps"]),
    ("sample-steps-5000", ["sample", "--count", "1", "--steps", "5000", "--output", "{tmp}/o.png"], None, False,
     ["5000"]),
    ("sample-count-0", ["sample", "--count", "0"], None, True, ["--count"]),
    ("sample-batch-0", S + ["--batch-size", "0"], None, True, ["--batch-size"]),
    ("sample-guidance-bogus", S + ["--guidance", "bogus"], None, True, ["bogus"]),
    ("sample-attention-bogus", S + ["--attention", "bogus", "--output", "{tmp}/o.png"], None, True, ["attention"]),
    ("sample-device-cuda", S + ["--device", "cuda", "--output", "{tmp}/o.png"], None, True, ["cuda"]),
    ("sample-device-bogus", S + ["--device", "toaster", "--output", "{tmp}/o.png"], None, True, ["toaster"]),
    ("sample-output-jpg", S + ["--output", "{tmp}/o.txt"], None, True, ["--output", "o.txt"]),
    ("sample-output-below-file", S + ["--output", "{tmp}/blocker/o.png"], BLOCKER, True, ["blocker"]),
    ("sample-output-is-dir", S + ["--output", "{tmp}"], None, True, ["--output"]),
    ("sample-output-exists", S + ["--output", "{tmp}/out.png"], EXISTING_OUT, True, ["out.png", "--overwrite"]),
    ("sample-fraction-no-teleport", S + ["--teleport-fraction", "0.5", "--output", "{tmp}/o.png"], None, True,
     ["teleport"]),
    ("sample-teleport-missing", S + ["--teleport", "{tmp}/none.safetensors", "--output", "{tmp}/o.png"], None, True,
     ["none.safetensors"]),
    ("sample-teleport-garbage", S + ["--teleport", "{tmp}/tele.safetensors", "--output", "{tmp}/o.png"],
     GARBAGE_TELEPORT, True, ["tele.safetensors"]),
    ("sample-teleport-not-zip", S + ["--teleport", "{tmp}/stats.npz", "--output", "{tmp}/o.png"], NOT_ZIP, True,
     ["stats.npz"]),
    ("sample-model-missing", S + ["--model", "{tmp}/nope", "--output", "{tmp}/o.png"], None, True, ["nope"]),
    ("sample-model-builtin-bogus", S + ["--model", "builtin:bogus", "--output", "{tmp}/o.png"], None, True,
     ["bogus"]),
    ("sample-model-truncated", S + ["--model", "{tmp}/m", "--output", "{tmp}/o.png"], _truncate, False,
     ["diffusion_pytorch_model.safetensors", "truncated"]),
    ("sample-model-bad-index", S + ["--model", "{tmp}/m", "--output", "{tmp}/o.png"],
     lambda t: (_digits(t) / "model_index.json").write_text("{oops"), False, ["model_index.json"]),
    ("sample-model-bad-unet-config", S + ["--model", "{tmp}/m", "--output", "{tmp}/o.png"],
     lambda t: (_digits(t) / "unet" / "config.json").write_text("[1,"), False, ["config.json"]),
    ("sample-model-weights-removed", S + ["--model", "{tmp}/m", "--output", "{tmp}/o.png"],
     lambda t: _weights(t).unlink(), False, ["unet", "weights"]),
    ("sample-model-nan-weights", S + ["--model", "{tmp}/m", "--output", "{tmp}/o.png"], _nan_weights, False,
     ["step"]),
    ("sample-solver-bogus", S + ["--solver", "bogus-solver", "--output", "{tmp}/o.png"], None, False, ["bogus-solver"]),
    ("sample-solver-bad-json", S + ["--solver", "{tmp}/sched.json", "--output", "{tmp}/o.png"], BAD_SCHEDULE, False,
     ["sched.json"]),
    ("sample-class-out-of-range", S + ["--classes", "12", "--output", "{tmp}/o.png"], None, False, ["12"]),
    ("sample-prompt-on-class-model", S + ["--prompt", "a cat", "--output", "{tmp}/o.png"], None, False, ["prompt"]),
    ("sample-unknown-option", ["sample", "--bogus", "1"], None, True, ["--bogus"]),
    ("sample-threads-neg", S + ["--threads", "-2", "--output", "{tmp}/o.png"], None, True, ["--threads"]),
    ("search-nfe-0", SS + ["--nfe", "0", "--out", "{tmp}/s.json"], None, True, ["--nfe"]),
    ("search-nfe-99", SS + ["--nfe", "99", "--out", "{tmp}/s.json"], None, True, ["--nfe", "99"]),
    ("search-budget-0", ["search-schedule", "--nfe", "4", "--budget", "0", "--out", "{tmp}/s.json"], None, True,
     ["--budget"]),
    ("search-out-not-json", SS + ["--nfe", "4", "--out", "{tmp}/s.txt"], None, True, ["--out"]),
    ("search-out-below-file", SS + ["--nfe", "4", "--out", "{tmp}/blocker/s.json"], BLOCKER, True, ["blocker"]),
    ("search-metric-bogus", SS + ["--nfe", "4", "--metric", "bogus", "--out", "{tmp}/s.json"], None, True,
     ["--metric"]),
    ("search-fid-other-model", SS + ["--nfe", "4", "--metric", "fid", "--model", "{tmp}/m", "--out", "{tmp}/s.json"],
     None, True, ["fid"]),
    ("search-scale-nan", SS + ["--nfe", "4", "--scale", "nan", "--out", "{tmp}/s.json"], None, True, ["--scale"]),
    ("search-truncated-state", SS + ["--nfe", "4", "--out", "{tmp}/s.json"], BAD_STATE, True, ["s.json.state.json"]),
    ("search-resume-other-nfe", SS + ["--nfe", "5", "--out", "{tmp}/s.json"], OTHER_STATE, True,
     ["s.json.state.json", "nfe"]),
    ("search-resume-other-seed", SS + ["--nfe", "4", "--seed", "3", "--out", "{tmp}/s.json"], OTHER_STATE, True,
     ["s.json.state.json", "seed"]),
    ("search-resume-other-scale", SS + ["--nfe", "4", "--scale", "5", "--out", "{tmp}/s.json"], OTHER_STATE, True,
     ["s.json.state.json", "scale"]),
    ("search-teleport-not-zip", SS + ["--nfe", "4", "--teleport", "{tmp}/stats.npz", "--out", "{tmp}/s.json"],
     NOT_ZIP, True, ["stats.npz"]),
    ("search-initial-bad-json", SS + ["--nfe", "4", "--initial", "{tmp}/sched.json", "--out", "{tmp}/s.json"],
     BAD_SCHEDULE, True, ["sched.json"]),
    ("search-device-cuda", SS + ["--nfe", "4", "--device", "cuda", "--out", "{tmp}/s.json"], None, True, ["cuda"]),
    ("prophet-overwrite", ["eval", "prophet", "--n", "5", "--out", "{tmp}/out.json"],
     _file("out.json", '{"mine": 1}'), True, ["out.json", "overwrite"]),
    ("fid-n-0", ["eval", "fid", "--fake", "builtin:digits", "--n", "0"], None, True, ["--n"]),
    ("fid-scale-nan", ["eval", "fid", "--fake", "builtin:digits", "--scale", "nan"], None, True, ["--scale"]),
    ("fid-guidance-bogus", ["eval", "fid", "--fake", "builtin:digits", "--guidance", "x"], None, True, ["--guidance"]),
    # the step count is checked against the model's schedule: after the (sub-second) model load, before sampling
    ("fid-steps-5000", ["eval", "fid", "--fake", "builtin:digits", "--steps", "5000", "--n", "4"], None, "nosample",
     ["5000"]),
    ("teleport-stats-ev-2", ["teleport-stats", "--explained-variance", "2", "--out", "{tmp}/t.safetensors"], None,
     True, ["explained"]),
    ("distill-recipe-bad-yaml", ["distill", "--config", "{tmp}/r.yaml"], RECIPE_BAD, True, ["r.yaml"]),
    ("distill-recipe-missing", ["distill", "--config", "{tmp}/none.yaml"], None, True, ["none.yaml"]),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(case, tmp_path, monkeypatch, capsys):
    from fastgen.cli import main

    _, argv, setup, upfront, words = case
    monkeypatch.chdir(tmp_path)
    if setup is not None:
        setup(tmp_path)
    if any("{tmp}/m" in a for a in argv) and not (tmp_path / "m").exists():
        _digits(tmp_path)
    if upfront == "nosample":
        _forbid_sampling(monkeypatch)
    elif upfront:
        _forbid_loading(monkeypatch)
    before = _hash_tree(tmp_path)
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--threads", "1"] * ("--threads" not in argv))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("usage:") and "|" not in ln
             and not ln.lstrip().startswith(("[", "warn", "Warn")) and "Warning" not in ln]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len([ln for ln in lines if "error:" in ln]) == 1, err
    line = next(ln for ln in lines if "error:" in ln)
    for word in words:
        assert word.lower().replace("_", "-") in line.lower().replace("_", "-"), line
    assert _hash_tree(tmp_path) == before


# ------------------------------------------------------------------------------------------------ Python API
def _pipe():
    return fastgen.load_builtin("digits")


@pytest.fixture(scope="module")
def pipe():
    return _pipe()


def _no_forward(pipe, monkeypatch):
    def boom(*a, **k):
        raise ModelLoaded("the network ran although the input was invalid up front")

    monkeypatch.setattr(pipe.unet, "forward", boom)


API_CALLS = [
    ("scale-nan", dict(guidance_scale=float("nan")), ValueError, "guidance_scale"),
    ("scale-neg", dict(guidance_scale=-5.0), ValueError, "guidance_scale"),
    ("scale-inf", dict(guidance_scale=float("inf")), ValueError, "guidance_scale"),
    ("steps-0", dict(num_inference_steps=0), ValueError, "num_inference_steps"),
    ("steps-5000", dict(num_inference_steps=5000), ValueError, "num_inference_steps"),
    ("steps-float", dict(num_inference_steps=2.5), (ValueError, TypeError), "num_inference_steps"),
    ("guidance-bogus", dict(guidance="bogus"), ValueError, "bogus"),
    ("solver-bogus", dict(solver="bogus-solver"), ValueError, "bogus-solver"),
    ("label-out-of-range", dict(class_labels=[42]), ValueError, "42"),
    ("seed-count", dict(class_labels=[1, 2], seed=[1, 2, 3]), ValueError, "seed"),
    ("fraction-no-teleport", dict(teleport_fraction=0.5), ValueError, "teleport"),
]


@pytest.mark.parametrize("case", API_CALLS, ids=[c[0] for c in API_CALLS])
def test_pipeline_call_bad_input(case, pipe, monkeypatch):
    _, kwargs, exc, word = case
    _no_forward(pipe, monkeypatch)
    kwargs = {"class_labels": [1], "num_inference_steps": 2, **kwargs}
    with pytest.raises(exc) as info:
        pipe(**kwargs)
    assert word in str(info.value) and "\n" not in str(info.value).strip()


def test_pipeline_huge_scale_warns(pipe):
    with pytest.warns(UserWarning, match="guidance_scale"):
        try:
            pipe(class_labels=[1], num_inference_steps=1, guidance_scale=1e30)
        except fastgen.sampling.NonFiniteError:
            pass  # a blob is refused too; the warning came first


def test_nan_weights_stop_with_the_step(tmp_path):
    _nan_weights(tmp_path)
    before = _hash_tree(tmp_path)
    pipe = FastGenClassPipeline.from_pretrained(tmp_path / "m")
    with pytest.raises(fastgen.sampling.NonFiniteError, match="step"):
        pipe(class_labels=[1], num_inference_steps=2)
    assert _hash_tree(tmp_path) == before


FOLDER_CASES = [
    ("truncated", _truncate, ValueError, "diffusion_pytorch_model.safetensors"),
    ("garbage-weights", lambda t: _weights(t).write_bytes(b"hello" * 50), ValueError, "diffusion_pytorch_model"),
    ("weights-removed", lambda t: _weights(t).unlink(), FileNotFoundError, "unet"),
    ("bad-index", lambda t: (_digits(t) / "model_index.json").write_text("{oops"), ValueError, "model_index.json"),
    ("index-not-object", lambda t: (_digits(t) / "model_index.json").write_text("[1]"), ValueError,
     "model_index.json"),
    ("index-no-class", lambda t: (_digits(t) / "model_index.json").write_text('{"unet": ["diffusers", "UNet2DModel"]}'),
     ValueError, "_class_name"),
    ("index-removed", lambda t: (_digits(t) / "model_index.json").unlink(), FileNotFoundError, "model_index.json"),
    ("unet-folder-removed", lambda t: shutil.rmtree(_digits(t) / "unet"), FileNotFoundError, "unet"),
    ("unet-config-bad", lambda t: (_digits(t) / "unet" / "config.json").write_text("[1,"), ValueError, "config.json"),
]


@pytest.mark.parametrize("case", FOLDER_CASES, ids=[c[0] for c in FOLDER_CASES])
def test_load_pipeline_bad_folder(case, tmp_path):
    from fastgen.builtin import load_pipeline

    _, setup, exc, word = case
    _digits(tmp_path)
    setup(tmp_path)
    before = _hash_tree(tmp_path)
    with pytest.raises(exc) as info:
        load_pipeline(str(tmp_path / "m"))
    assert word in str(info.value) and "\n" not in str(info.value)
    assert _hash_tree(tmp_path) == before


@pytest.mark.parametrize("setup, word", [(_truncate, "diffusion_pytorch_model.safetensors"),
                                         (lambda t: (_digits(t) / "model_index.json").write_text("{"),
                                          "model_index.json")], ids=["truncated", "bad-index"])
def test_from_pretrained_names_the_file(setup, word, tmp_path):
    """diffusers' own loader (no fastgen wrapper): still an OSError naming the file."""
    _digits(tmp_path)
    setup(tmp_path)
    with pytest.raises(OSError, match=word.replace(".", r"\.")):
        FastGenClassPipeline.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("name, exc", [("bogus", ValueError), ("", ValueError)])
def test_load_builtin_bad_name(name, exc):
    with pytest.raises(exc, match="builtin name"):
        fastgen.load_builtin(name)


def test_load_pipeline_bad_type():
    from fastgen.builtin import load_pipeline

    with pytest.raises(TypeError, match="model"):
        load_pipeline(42)


STATS_CASES = [
    ("missing", None, FileNotFoundError),
    ("not-zip", b"this is not a zip archive", ValueError),
    ("garbage-safetensors", b"\x00\x01garbage" * 10, ValueError),
    ("empty-safetensors", b"", ValueError),
]


@pytest.mark.parametrize("case", STATS_CASES, ids=[c[0] for c in STATS_CASES])
def test_gaussian_stats_load_bad_file(case, tmp_path):
    from fastgen.teleport import GaussianStats

    name, data, exc = case
    path = tmp_path / ("stats.npz" if name in ("missing", "not-zip") else "stats.safetensors")
    if data is not None:
        path.write_bytes(data)
    before = _hash_tree(tmp_path)
    with pytest.raises(exc) as info:
        GaussianStats.load(path)
    assert path.name in str(info.value) and "pickled" not in str(info.value)
    assert _hash_tree(tmp_path) == before


def test_schedule_file_bad(tmp_path):
    from fastgen.solvers.usf import SolverSchedule

    (tmp_path / "s.json").write_text("{oops")
    with pytest.raises(ValueError, match="s.json"):
        SolverSchedule.load(tmp_path / "s.json")
    with pytest.raises(FileNotFoundError, match="none.json"):
        SolverSchedule.load(tmp_path / "none.json")


@pytest.mark.parametrize("field, value", [("order", 9), ("prediction", "bogus"), ("corrector", "bogus"),
                                          ("start_point", 0), ("relaxation", "bogus")])
def test_usf_step_decision_bad_value(field, value):
    from fastgen.solvers.usf import StepDecision

    with pytest.raises(ValueError, match=field):
        StepDecision(**{"prediction": "data", "order": 1, field: value}).validate()


@pytest.mark.parametrize("schedule, exc, word", [("{tmp}/none.json", FileNotFoundError, "none.json"),
                                                 ("{tmp}/s.json", ValueError, "s.json"),
                                                 (42, ValueError, "schedule")], ids=["missing", "bad-json", "int"])
def test_usf_scheduler_bad_schedule(schedule, exc, word, tmp_path):
    from fastgen.solvers.scheduler import USFScheduler

    (tmp_path / "s.json").write_text("{oops")
    if isinstance(schedule, str):
        schedule = schedule.replace("{tmp}", str(tmp_path))
    with pytest.raises(exc, match=word):
        USFScheduler(schedule=schedule)


@pytest.mark.parametrize("kwargs, word", [(dict(num_samples=0), "num_samples"),
                                          (dict(guidance_scale=float("nan")), "guidance_scale"),
                                          (dict(num_inference_steps=0), "num_inference_steps"),
                                          (dict(batch_size=0), "batch_size")])
def test_evaluate_pipeline_bad_input(kwargs, word, pipe, monkeypatch):
    from fastgen.metrics import evaluate_pipeline

    _no_forward(pipe, monkeypatch)
    with pytest.raises(ValueError, match=word):
        evaluate_pipeline(pipe, **{"num_samples": 4, "num_inference_steps": 2, "progress": False, **kwargs})


@pytest.mark.parametrize("kwargs, word", [(dict(max_train_steps=0), "max_train_steps"),
                                          (dict(learning_rate=float("nan")), "learning_rate"),
                                          (dict(learning_rate=-1.0), "learning_rate"),
                                          (dict(train_batch_size=0), "train_batch_size"),
                                          (dict(method="bogus"), "method"),
                                          (dict(guidance_scale=float("nan")), "guidance_scale")])
def test_distill_config_bad_value(kwargs, word):
    from fastgen.training.config import DistillConfig

    with pytest.raises(ValueError, match=word):
        DistillConfig(**kwargs).validate(check_paths=False)


@pytest.mark.parametrize("module", ["fastgen.generate", "fastgen.evaluation", "fastgen.teleport_stats",
                                    "fastgen.search_schedule", "fastgen.metrics", "fastgen.solvers.search"])
def test_default_commands_import_without_optional_extras(module):
    """README command 1 installs no optional extras: the default commands' library modules import without them
    (sklearn, matplotlib, torch-fidelity, xformers blocked)."""
    import subprocess
    import sys

    code = ("import sys; sys.modules.update({m: None for m in ('sklearn', 'matplotlib', 'torch_fidelity', "
            "'xformers')}); import fastgen.cli; fastgen.cli._build(); import " + module)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
