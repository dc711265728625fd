"""The one evaluator (fastgen.metrics.evaluate_pipeline / evaluate_images) on the built-in digits model."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

import fastgen
from fastgen.metrics import (ReferenceStats, builtin_reference_path, evaluate_images, evaluate_pipeline,
                             frechet_distance, get_extractor, roughness)

REPO = Path(__file__).resolve().parents[1]
NFE5 = REPO / "fastgen" / "assets" / "digits-schedules" / "nfe5.json"
QUIET = dict(progress=False)


@pytest.fixture(scope="module")
def pipe():
    p = fastgen.load_builtin("digits")
    p.set_progress_bar_config(disable=True)
    return p


# ----------------------------------------------------------------------------- roughness (closed forms)
def test_roughness_closed_forms():
    i, j = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    checker = ((i + j) % 2).double().view(1, 1, 8, 8)
    stripes = (i % 2).double().view(1, 1, 8, 8)  # rows alternate: vertical pairs differ by 1, horizontal by 0
    ramp = (j / 7).double().view(1, 1, 8, 8)  # horizontal steps of 1/7, vertical 0
    assert roughness(checker) == pytest.approx(1.0)
    assert roughness(stripes) == pytest.approx(0.5)
    assert roughness(ramp) == pytest.approx(0.5 / 7)
    assert roughness(torch.full((2, 3, 8, 8), 0.3)) == 0.0
    # 4x6 stripes along rows: 3*6 vertical pairs of 1, 4*5 horizontal pairs of 0 -> 18 / 38
    rect = (torch.arange(4) % 2).double().view(1, 1, 4, 1).expand(1, 1, 4, 6)
    assert roughness(rect) == pytest.approx(18 / 38)
    # per-image mean, then over images (and the evaluator reports the same)
    both = torch.cat([checker, torch.zeros_like(checker)])
    assert roughness(both) == pytest.approx(0.5)
    res = evaluate_images(both.float(), knn_metrics=False, **QUIET)
    assert res.roughness == pytest.approx(0.5)


# ----------------------------------------------------------------------------- FID and invariances
def test_fid_equals_hand_computed_frechet_distance(pipe):
    n = 24
    res = evaluate_pipeline(pipe, n, seed=5, num_inference_steps=3, batch_size=10, knn_metrics=False, **QUIET)
    # the same samples by hand: sample i -> seed 5 + i, digit i % 10; features; numpy mean/covariance
    out = pipe(class_labels=[i % 10 for i in range(n)], seed=[5 + i for i in range(n)], num_inference_steps=3,
               output_type="pt")
    feats = get_extractor("digits")(out.images.float()).numpy()
    ref = ReferenceStats.load(builtin_reference_path("digits"))
    expected = frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), ref.mu, ref.sigma)
    assert res.fid == pytest.approx(expected, rel=1e-5)
    assert res.num_samples == n and res.num_reference == 1000 and res.nfe == 6
    labels = torch.arange(n) % 10
    predicted = get_extractor("digits").classify(out.images.float())
    assert res.accuracy == pytest.approx(float((predicted == labels).double().mean()))


def test_result_independent_of_batch_size(pipe):
    kw = dict(num_inference_steps=2, kid_subset_size=20, kid_subsets=5, **QUIET)
    a = evaluate_pipeline(pipe, 50, batch_size=7, **kw)
    b = evaluate_pipeline(pipe, 50, batch_size=50, **kw)
    for key in ("fid", "kid", "precision", "recall", "accuracy", "roughness", "mean_abs", "clipped_fraction", "nfe"):
        assert getattr(a, key) == pytest.approx(getattr(b, key), rel=1e-4, abs=1e-6), key
    assert torch.allclose(a.features.features, b.features.features, atol=1e-4)


def test_pinned_numbers_of_a_known_good_run(pipe):
    """64 samples, seed 0, CFG 3 (the model's default), digits features vs the shipped train statistics."""
    res = evaluate_pipeline(pipe, 64, num_inference_steps=4, batch_size=32, knn_metrics=False, **QUIET)
    assert res.fid == pytest.approx(9.354160, rel=1e-4)
    assert res.roughness == pytest.approx(0.0984774, rel=1e-4)
    assert res.accuracy == 1.0 and res.nfe == 8
    usf = evaluate_pipeline(pipe, 64, num_inference_steps=5, solver="usf-default", batch_size=64, knn_metrics=False,
                            **QUIET)
    s3 = evaluate_pipeline(pipe, 64, num_inference_steps=5, solver=str(NFE5), batch_size=64, knn_metrics=False, **QUIET)
    assert usf.fid == pytest.approx(USF_DEFAULT_NFE5_FID64, rel=1e-4)
    assert s3.fid == pytest.approx(S3_NFE5_FID64, rel=1e-4)


USF_DEFAULT_NFE5_FID64 = 7.580206  # known-good run (CPU, torch 2.13, before the Core II sampling rewrite)
S3_NFE5_FID64 = 5.638103


def test_every_solver_form_is_accepted(pipe, tmp_path):
    from diffusers import DDIMScheduler

    from fastgen.solvers import SolverSchedule

    schedule = SolverSchedule.load(NFE5)
    forms = {"usf-default": ("usf-default", 2), "SolverSchedule": (schedule, schedule.num_evals),
             "path": (str(NFE5), schedule.num_evals), "Path": (NFE5, schedule.num_evals),
             "diffusers scheduler": (DDIMScheduler.from_config(pipe.scheduler.config), 2), "name": ("unipc", 2),
             "None": (None, 2)}
    results = {}
    for name, (solver, steps) in forms.items():
        res = evaluate_pipeline(pipe, 8, num_inference_steps=steps, solver=solver, batch_size=8, knn_metrics=False,
                                **QUIET)
        assert np.isfinite(res.fid) and res.num_samples == 8, name
        results[name] = res.fid
    assert results["path"] == results["SolverSchedule"] == results["Path"]
    # guidance and teleport values go through unchanged too
    teleport = REPO / "fastgen" / "assets" / "digits-teleport" / "stats.safetensors"
    res = evaluate_pipeline(pipe, 8, num_inference_steps=3, guidance="apg", teleport=str(teleport),
                            teleport_fraction=0.3, knn_metrics=False, **QUIET)
    assert np.isfinite(res.fid)
    # and the pipeline, not the evaluator, rejects bad values
    with pytest.raises(ValueError, match="solver must be"):
        evaluate_pipeline(pipe, 8, num_inference_steps=2, solver="no-such-solver", knn_metrics=False, **QUIET)


def test_bad_arguments_fail_before_sampling(pipe, tmp_path):
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        evaluate_pipeline(pipe, 0)
    with pytest.raises(ValueError, match="labels must have one class per sample"):
        evaluate_pipeline(pipe, 4, labels=[1, 2])
    with pytest.raises(ValueError, match="grid must be a .png"):
        evaluate_pipeline(pipe, 4, grid=tmp_path / "g.jpg")
    with pytest.raises(TypeError, match="reference must be"):
        evaluate_pipeline(pipe, 4, reference=3.0, num_inference_steps=1)


def test_builtin_reference_matches_the_train_split_and_heldout_scores(tmp_path):
    path = builtin_reference_path("digits")
    assert path.name == "digits_train_stats.npz" and path.is_file()
    res = evaluate_images("builtin:digits:train", reference="builtin:digits", knn_metrics=False, **QUIET)
    assert abs(res.fid) < 1e-6  # the shipped statistics are the train split's
    held = evaluate_images("builtin:digits:heldout", grid=tmp_path / "held.png", grid_count=20, **QUIET)
    assert held.num_samples == 297 and held.fid == pytest.approx(3.45661, rel=1e-4)
    assert held.accuracy == pytest.approx(294 / 297)
    assert PIL.Image.open(tmp_path / "held.png").width > 100
    with pytest.raises(ValueError, match="builtin reference must be one of"):
        builtin_reference_path("cifar")


# ----------------------------------------------------------------------------- processes
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_SCRIPT = """
import json, sys, fastgen
from fastgen.metrics import evaluate_pipeline
pipe = fastgen.load_builtin("digits"); pipe.set_progress_bar_config(disable=True)
res = evaluate_pipeline(pipe, 10, batch_size=3, num_inference_steps=2, kid_subset_size=8, kid_subsets=5,
                        progress=False, device="cpu", grid=sys.argv[1])
from accelerate import PartialState
if PartialState().is_main_process:
    print(json.dumps(res.to_dict()))
"""


def test_two_processes_equal_one(tmp_path):
    script = tmp_path / "ev.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}

    def run(launch, grid):
        proc = subprocess.run([*launch, str(script), str(grid)], capture_output=True, text=True, env=env, timeout=300,
                              cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        assert len(lines) == 1, proc.stdout  # only the main process prints
        return json.loads(lines[0])

    single = run([sys.executable], tmp_path / "one.png")
    # accelerate 1.x runs `launch --cpu` single-process; the torchrun launcher (--multi_gpu) with device="cpu"
    # gives 2 MULTI_CPU (gloo) processes.
    double = run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", str(_free_port())], tmp_path / "two.png")
    assert single["processes"] == 1 and double["processes"] == 2 and double["num_samples"] == 10
    for key in ("fid", "kid", "precision", "recall", "accuracy", "roughness", "mean_abs", "clipped_fraction", "nfe"):
        assert double[key] == pytest.approx(single[key], rel=1e-6, abs=1e-9), key
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(tmp_path / "two.png")),
                                  np.asarray(PIL.Image.open(tmp_path / "one.png")))  # gathered in seed order
