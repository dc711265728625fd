"""Issue 15: the interval-CFG baseline, distance to the reference solution, model guidance settings, digits-small."""
import json
import logging

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from fastgen import FastGenClassPipeline
from fastgen.denoiser import Denoiser, GuidedDenoiser
from fastgen.guidance import CFG, CFGInterval, resolve_guidance
from tiny import tiny_class_unet

logging.getLogger("diffusers.guiders.guider_utils").setLevel(logging.ERROR)
N = 6
LABELS = [1, 5, 7]


@pytest.fixture(scope="module")
def tiny_pipe():
    pipe = FastGenClassPipeline(scheduler=DDIMScheduler(), unet=tiny_class_unet(), id2label={i: str(i) for i in range(10)})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, guidance, scale=3.0, **kw):
    return pipe(LABELS, num_inference_steps=N, guidance=guidance, guidance_scale=scale, seed=0, output_type="np", **kw)


def step_sigmas(pipe):
    """EDM sigma = sigma_t / alpha_t at each of the N steps of the tiny pipeline's DDIM run."""
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(N)
    den = Denoiser.from_scheduler(pipe.unet, sched)
    out = []
    for t in sched.timesteps:
        a, s = den.alpha_sigma(t, like=torch.zeros(1, 1, 1, 1))
        out.append(float(s.double().reshape(-1)[0] / a.double().reshape(-1)[0]))  # as the guider computes it
    return out


# ---------------------------------------------------------------- 1. interval baseline
def test_interval_covering_every_step_is_cfg_and_empty_interval_is_conditional_only(tiny_pipe):
    cfg = run(tiny_pipe, CFG(guidance_scale=3.0))
    full = run(tiny_pipe, CFGInterval(guidance_scale=3.0, sigma_low=None, sigma_high=None))
    assert np.array_equal(full.images, cfg.images) and full.nfe == cfg.nfe == 2 * N
    wide = run(tiny_pipe, CFGInterval(guidance_scale=3.0, sigma_low=0.0, sigma_high=1e9))
    assert np.array_equal(wide.images, cfg.images) and wide.nfe == 2 * N
    cond = run(tiny_pipe, None, scale=1.0)
    empty = run(tiny_pipe, CFGInterval(guidance_scale=3.0, sigma_low=None, sigma_high=1e-6))
    assert np.array_equal(empty.images, cond.images) and empty.nfe == cond.nfe == N
    assert not np.array_equal(cfg.images, cond.images)  # guidance matters on this model


@pytest.mark.parametrize("first,last", [(0, 1), (2, 4), (3, 5)])
def test_sigma_interval_guides_exactly_its_steps_with_exact_nfe(tiny_pipe, first, last):
    sig = step_sigmas(tiny_pipe)
    assert all(a > b for a, b in zip(sig, sig[1:]))
    # bounds half-way (geometric) between neighbouring steps: steps first..last are inside (low, high]
    high = None if first == 0 else (sig[first - 1] * sig[first]) ** 0.5
    low = None if last == N - 1 else (sig[last] * sig[last + 1]) ** 0.5
    guider = CFGInterval(guidance_scale=3.0, sigma_low=low, sigma_high=high)
    out = run(tiny_pipe, guider)
    k = last - first + 1
    assert out.nfe == 2 * k + (N - k)
    assert [s["nfe"] for s in out.steps] == [2 if first <= i <= last else 1 for i in range(N)]
    # the same steps guided by diffusers' own step window (CFG start/stop)
    window = CFG(guidance_scale=3.0, start=first / N + 1e-9, stop=min(1.0, (last + 1) / N + 1e-9))
    ref = run(tiny_pipe, window)
    assert np.array_equal(out.images, ref.images) and ref.nfe == out.nfe


def test_sigma_bounds_are_open_below_and_closed_above(tiny_pipe):
    sig = step_sigmas(tiny_pipe)
    only = run(tiny_pipe, CFGInterval(guidance_scale=3.0, sigma_low=sig[3], sigma_high=sig[2]))
    assert [s["nfe"] for s in only.steps] == [1, 1, 2, 1, 1, 1]


def test_step_window_interval_equals_cfg_window_and_counts_nfe(tiny_pipe):
    out = run(tiny_pipe, CFGInterval(guidance_scale=5.0, sigma_low=None, sigma_high=None, stop=0.5))
    ref = run(tiny_pipe, CFG(guidance_scale=5.0, stop=0.5), scale=5.0)
    assert np.array_equal(out.images, ref.images) and out.nfe == ref.nfe == 2 * 3 + 3


def test_per_row_sigma_interval_outside_sampling(tiny_pipe):
    """Training-style call: one time per row, step=None; rows inside the interval get CFG, the others the
    conditional prediction, and only the inside rows pay for the unconditional branch."""
    den = Denoiser.from_scheduler(tiny_pipe.unet, tiny_pipe.scheduler)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999, 700, 300, 20])
    a, s = den.alpha_sigma(t, like=x)
    sig = (s / a).reshape(-1)
    low, high = float(sig[2]) * 0.99, float(sig[1]) * 1.01   # rows 1 and 2 inside
    cond = {"class_labels": torch.tensor([1, 2, 3, 4])}
    uncond = {"class_labels": torch.full((4,), 10)}
    with torch.no_grad():
        got = GuidedDenoiser(den, CFGInterval(3.0, sigma_low=low, sigma_high=high), cond, uncond)(x, t)
        cfg = GuidedDenoiser(den, CFG(guidance_scale=3.0), cond, uncond)(x, t)
        plain = GuidedDenoiser(den, None, cond, uncond)(x, t)
    assert got.nfe_per_row.tolist() == [1, 2, 2, 1]
    torch.testing.assert_close(got.model_output[1:3], cfg.model_output[1:3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.model_output[[0, 3]], plain.model_output[[0, 3]], rtol=1e-5, atol=1e-5)


def test_interval_name_registry_and_bad_arguments():
    g = resolve_guidance("cfg-interval", 4.0)
    assert isinstance(g, CFGInterval) and (g.sigma_low, g.sigma_high) == (0.28, 5.42) and g.guidance_scale == 4.0
    with pytest.raises(ValueError, match="sigma_low"):
        CFGInterval(3.0, sigma_low=2.0, sigma_high=1.0)
    with pytest.raises(ValueError, match="sigma_high"):
        CFGInterval(3.0, sigma_high=-1.0)
    with pytest.raises(ValueError, match="noise level"):
        CFGInterval(3.0).forward(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))


# ---------------------------------------------------------------- 2. distance to the reference solution
@pytest.fixture(scope="module")
def digits():
    import fastgen

    pipe = fastgen.load_builtin("digits")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_rms_distance_closed_forms():
    from fastgen.metrics import rms_distance

    a = torch.zeros(2, 1, 1, 1)
    assert rms_distance(a, torch.tensor([3.0, 4.0]).view(2, 1, 1, 1)) == pytest.approx((12.5) ** 0.5, abs=0)
    x = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    assert rms_distance(x, x + 0.25) == pytest.approx(0.25, rel=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        rms_distance(x, x[:2])


def test_reference_solvers_own_distance_is_zero_and_few_steps_are_further(digits):
    from fastgen.metrics import evaluate_pipeline, reference_solution

    n, kw = 6, dict(guidance_scale=2.0, knn_metrics=False, progress=False, classifier=None)
    ref = reference_solution(digits, n, seed=3, steps=12, guidance_scale=2.0, batch_size=4)
    assert ref.shape == (n, 1, 16, 16) and 0 <= float(ref.min()) and float(ref.max()) <= 1
    same = evaluate_pipeline(digits, n, seed=3, num_inference_steps=12, solver="dpmsolver++", reference_samples=ref,
                             batch_size=4, **kw)
    assert same.rms_to_reference == 0.0
    rebatched = evaluate_pipeline(digits, n, seed=3, num_inference_steps=12, solver="dpmsolver++",
                                  reference_samples=ref, batch_size=5, **kw)
    assert rebatched.rms_to_reference < 1e-6  # other batch shapes: float round-off only
    shifted = evaluate_pipeline(digits, n, seed=3, num_inference_steps=12, solver="dpmsolver++",
                                reference_samples=ref + 0.125, batch_size=6, **kw)  # closed form: a constant shift
    assert shifted.rms_to_reference == pytest.approx(0.125, rel=1e-6)
    dist = [evaluate_pipeline(digits, n, seed=3, num_inference_steps=s, solver="dpmsolver++", reference_samples=ref,
                              **kw).rms_to_reference for s in (2, 4)]
    assert dist[0] > dist[1] > 0.0
    other = evaluate_pipeline(digits, n, seed=4, num_inference_steps=12, solver="dpmsolver++", reference_samples=ref,
                              **kw)  # other seeds: not the same noise, far away
    assert other.rms_to_reference > 3 * dist[1]
    with pytest.raises(ValueError, match="reference_samples"):
        evaluate_pipeline(digits, n + 1, reference_samples=ref, num_inference_steps=1, **kw)
    with pytest.raises(ValueError, match="num_inference_steps"):
        reference_solution(digits, 2, num_inference_steps=3)


def test_rms_search_fitness_is_the_shared_distance(digits):
    from fastgen.metrics import rms_distance, reference_solution
    from fastgen.solvers.evaluate import SEARCH_SEED, ScheduleEvaluator, run_schedule

    ev = ScheduleEvaluator(digits, samples=4, reference_steps=8, scale=2.0)
    ref = reference_solution(digits, 4, seed=SEARCH_SEED, steps=8, guidance_scale=2.0)
    assert torch.equal(ev.reference, ref)
    assert ev(("dpmsolver++", 8, None, 0.0)) == 0.0
    few = run_schedule(digits, ("dpmsolver++", 3, None, 0.0), ev.labels, ev.seeds, 2.0)
    assert ev(("dpmsolver++", 3, None, 0.0)) == rms_distance(few, ref) > 0


# ---------------------------------------------------------------- 3. defaults that work on the built-in models
def test_model_settings_apply_to_names_only_and_other_models_keep_paper_defaults(tmp_path):
    from fastgen import builtin_path
    from fastgen.guidance import APG, AdaptiveGuidance, LinearAG

    folder = builtin_path("digits")
    apg = resolve_guidance("apg", 3.0, model_path=folder)
    ag = resolve_guidance("ag", 3.0, model_path=folder)
    lag = resolve_guidance("linear-ag", 3.0, model_path=folder)
    assert (apg.norm_threshold, apg.eta, apg.momentum) == (1.0, 0.0, -0.5)
    assert (ag.space, ag.threshold) == ("x0", 0.95) and (lag.space, lag.threshold) == ("x0", 0.95)
    assert isinstance(lag, LinearAG) and lag.guidance_scale == 3.0
    # no settings file (any other model), no model path, or a guider object: the papers' defaults / as given
    for path in (tmp_path, None):
        assert resolve_guidance("apg", 3.0, model_path=path).norm_threshold == APG().norm_threshold == 15.0
        assert resolve_guidance("ag", 3.0, model_path=path).space == "eps"
    mine = AdaptiveGuidance(guidance_scale=3.0)
    assert resolve_guidance(mine, 3.0, model_path=folder) is mine and mine.threshold == 0.991


def test_bad_settings_files_name_the_file(tmp_path):
    from fastgen.guidance.model_settings import SETTINGS_FILE, SETTINGS_FORMAT

    path = tmp_path / SETTINGS_FILE
    path.write_text("{not json")
    with pytest.raises(ValueError, match="guidance.json"):
        resolve_guidance("ag", 3.0, model_path=tmp_path)
    path.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match=SETTINGS_FORMAT):
        resolve_guidance("ag", 3.0, model_path=tmp_path)
    path.write_text(json.dumps({"format": SETTINGS_FORMAT, "ag": {"threshhold": 0.9}}))
    with pytest.raises(ValueError, match="threshhold"):
        resolve_guidance("ag", 3.0, model_path=tmp_path)
    path.write_text(json.dumps({"format": SETTINGS_FORMAT, "ag": {"space": "latent"}}))
    with pytest.raises(ValueError, match="space must be one of"):
        resolve_guidance("ag", 3.0, model_path=tmp_path)


@pytest.mark.parametrize("name", ["digits", "digits-small"])
def test_guidance_names_work_out_of_the_box_on_the_builtin_models(name):
    import fastgen

    pipe = fastgen.load_builtin(name)
    pipe.set_progress_bar_config(disable=True)
    labels, steps = list(range(10)), 20
    kw = dict(num_inference_steps=steps, guidance_scale=3.0, seed=0, output_type="np")
    cfg = pipe(labels, guidance="cfg", **kw)
    ag = pipe(labels, guidance="ag", **kw)
    assert steps + 1 < ag.nfe < 2 * steps  # guided for a while, then conditional only (no trip at step 0)
    lag = pipe(labels, guidance="linear-ag", **kw)  # fitted coefficients found next to the model
    assert steps + 1 < lag.nfe < ag.nfe
    apg = pipe(labels, guidance="apg", **kw)
    assert apg.nfe == cfg.nfe == 2 * steps and not np.array_equal(apg.images, cfg.images)
    interval = pipe(labels, guidance="cfg-interval", **kw)
    assert steps < interval.nfe < 2 * steps


# ---------------------------------------------------------------- 4. the fronts comparison (benchmark logic)
def _fronts_module():
    import runpy
    from pathlib import Path

    return runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "guidance_fronts.py"),
                          run_name="fronts_under_test")


def test_fronts_compare_points_to_both_baselines_at_equal_accuracy():
    m = _fronts_module()
    cell = lambda method, scale, acc, fid, nfe=40.0: dict(method=method, scale=scale, accuracy=acc, fid=fid, nfe=nfe)  # noqa: E731
    cells = [cell("none", 1.0, 0.6, 20.0, 20.0),
             cell("cfg", 2.0, 0.8, 10.0), cell("cfg", 4.0, 1.0, 12.0),
             cell("cfg-interval", 2.0, 0.7, 14.0, 30.0), cell("cfg-interval", 4.0, 0.9, 8.0, 30.0),
             cell("apg", 2.0, 0.7, 14.5), cell("apg", 4.0, 0.95, 9.0),
             cell("ag", 2.0, 0.85, 9.0, 25.0), cell("cfg-first-k:ag", 2.0, 0.8, 9.5, 25.0)]
    cells[-1]["first_k_steps"] = 5
    # closed forms: CFG at accuracy 0.7 is half-way between (0.6, 20) and (0.8, 10) -> 15
    assert m["at_accuracy"](m["curve"](cells, "cfg"), 0.7) == pytest.approx(15.0)
    assert m["at_accuracy"](m["curve"](cells, "cfg"), 1.01) is None
    comp = m["compare"]({"cells": cells})
    apg = comp["per_point"]["apg"]
    assert apg["2"]["cfg_fid_at_same_accuracy"] == pytest.approx(15.0)
    assert apg["2"]["cfg-interval_fid_at_same_accuracy"] == pytest.approx(14.0)
    assert apg["2"]["below_baselines"] is False  # below CFG (14.5 < 15) but not below the interval (14.0)
    assert apg["4"]["below_baselines"] is None   # the interval never reaches 95% accuracy: no match
    ag = comp["per_point"]["ag"]["2"]
    assert ag["cfg_fid_at_same_accuracy"] == pytest.approx(10.5) and ag["below_baselines"] is True
    assert ag["beats_equal_nfe_baseline"] is True and ag["equal_nfe_baseline"]["first_k_steps"] == 5
    assert comp["verdict"]["ag"]["beats_cfg_at_matched_accuracy"] is True
    assert comp["verdict"]["apg"]["beats_cfg_at_matched_accuracy"] is False
    assert "| apg | 2 | 70.0% | 14.50 | 15.00 | 14.00 | no | 40.0 |" in m["table"]({"cells": cells})


# ---------------------------------------------------------------- 5. the second workload
def test_digits_small_is_a_workload_where_guidance_lowers_fid():
    import fastgen
    from fastgen.metrics import evaluate_pipeline

    pipe = fastgen.load_builtin("digits-small")
    pipe.set_progress_bar_config(disable=True)
    assert fastgen.builtin_path("digits-small").name == "digits-small" and pipe.num_classes == 10
    assert sum(p.numel() for p in pipe.unet.parameters()) == 280_881
    kw = dict(num_inference_steps=10, batch_size=100, progress=False, knn_metrics=False)
    plain = evaluate_pipeline(pipe, 100, guidance_scale=1.0, **kw)
    guided = evaluate_pipeline(pipe, 100, guidance_scale=3.0, **kw)
    assert guided.fid < 0.8 * plain.fid and guided.accuracy > plain.accuracy
    # pinned from a known-good run (100 samples, 10 steps): 32.70 / 64% unguided, 8.28 / 94% at w = 3
    assert (plain.fid, plain.accuracy) == (pytest.approx(32.701, rel=2e-3), 0.64)
    assert (guided.fid, guided.accuracy) == (pytest.approx(8.2802, rel=2e-3), 0.94)
