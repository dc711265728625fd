"""APG, Adaptive Guidance and LinearAG: exact special cases against diffusers, NFE, state resets, pipelines."""
import json
import logging

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from diffusers.guiders import AdaptiveProjectedGuidance, ClassifierFreeGuidance

from fastgen import FastGenClassPipeline, FastGenStableDiffusionPipeline, FastGenStableDiffusionXLPipeline
from fastgen.cli import main as cli_main
from fastgen.guidance import (APG, CFG, AdaptiveGuidance, LinearAG, available_guidance, fit_linear_ag_coefficients,
                              resolve_guidance)
from fastgen.guidance.adaptive import least_squares
from fastgen.guidance.calibrate import fit_linear_ag, save_linear_ag
from tiny import tiny_class_unet, tiny_sd, tiny_sdxl

logging.getLogger("diffusers.guiders.guider_utils").setLevel(logging.ERROR)
N = 6


@pytest.fixture(scope="module")
def digits_like():
    pipe = FastGenClassPipeline(scheduler=DDIMScheduler(), unet=tiny_class_unet(), id2label={i: str(i) for i in range(10)})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return FastGenStableDiffusionPipeline.from_pipe(tiny_sd(tmp_path_factory.mktemp("sd")))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return tiny_sdxl(tmp_path_factory.mktemp("sdxl"))


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class Counter:
    """Counts network evaluations (rows of every forward batch)."""

    def __init__(self, module):
        self.rows = 0
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        self.rows += x.shape[0]

    def close(self):
        self.handle.remove()


# ---------------------------------------------------------------- APG
def test_apg_equals_diffusers_paper_form_over_steps_with_momentum():
    ours = APG(guidance_scale=7.0, eta=0.0, norm_threshold=15.0, momentum=-0.5)
    ref = AdaptiveProjectedGuidance(guidance_scale=6.0, use_original_formulation=True, eta=0.0,
                                    adaptive_projected_guidance_rescale=15.0, adaptive_projected_guidance_momentum=-0.5)
    ours.begin_run(num_inference_steps=5)
    worst, clipped = 0.0, 0
    for step in range(5):
        cond, uncond = rand(2, 4, 8, 8, seed=step), rand(2, 4, 8, 8, seed=100 + step)
        for g in (ours, ref):
            g.set_state(step=step, num_inference_steps=5, timestep=torch.tensor(999 - step))
        ref.prepare_inputs({"x": (cond, uncond)})
        a, b = ours(_batches(cond, uncond)).pred, ref(_batches(cond, uncond)).pred
        worst = max(worst, float((a - b).abs().max()))
        clipped += int((ours.momentum_buffer.flatten(1).norm(dim=1) > 15).any())
    assert worst <= 1e-6
    assert clipped > 0  # clipping was active
    # the default (uncond-anchored) diffusers form is a different method
    loose = AdaptiveProjectedGuidance(guidance_scale=7.0, eta=0.0)
    loose.set_state(step=0, num_inference_steps=5, timestep=torch.tensor(999))
    assert (loose.forward(rand(2, 4, 8, 8), rand(2, 4, 8, 8, seed=1)).pred
            - APG(guidance_scale=7.0, momentum=None).forward(rand(2, 4, 8, 8), rand(2, 4, 8, 8, seed=1)).pred).abs().max() > 1


def _batches(cond, uncond):
    from diffusers.modular_pipelines.modular_pipeline import BlockState
    return [BlockState(noise_pred=cond, __guidance_identifier__="pred_cond"),
            BlockState(noise_pred=uncond, __guidance_identifier__="pred_uncond")]


def test_apg_reduces_to_cfg_and_keeps_invariants():
    cond, uncond = rand(3, 4, 8, 8), rand(3, 4, 8, 8, seed=1)
    cfg = ClassifierFreeGuidance(guidance_scale=5.0).forward(cond, uncond).pred
    plain = APG(guidance_scale=5.0, eta=1.0, norm_threshold=0.0, momentum=None).forward(cond, uncond).pred
    assert (plain - cfg).abs().max() < 1e-5
    apg = APG(guidance_scale=5.0, eta=0.0, norm_threshold=3.0, momentum=None)
    update = apg.update(cond, uncond)
    assert ((update * cond).flatten(1).sum(1).abs() < 1e-4).all()  # orthogonal to D_c
    assert (update.flatten(1).norm(dim=1) <= 3.0 + 1e-5).all()    # ‖Δ⊥‖ ≤ ‖Δ‖ ≤ r
    apg = APG(guidance_scale=5.0, momentum=-0.5, norm_threshold=0.0)
    diffs = [rand(1, 2, 4, 4, seed=s) for s in range(4)]
    for d in diffs:
        apg.update(d + 1.0, torch.ones_like(d))
    expected = sum((-0.5) ** (3 - j) * (diffs[j] + 1.0 - 1.0) for j in range(4))
    assert (apg.momentum_buffer - expected).abs().max() < 1e-6


def test_apg_state_resets_every_run_also_mid_schedule(digits_like):
    apg = APG(guidance_scale=4.0, norm_threshold=1.0, momentum=-0.5)
    a = digits_like([1, 2], num_inference_steps=N, guidance=apg, seed=0, output_type="np").images
    b = digits_like([1, 2], num_inference_steps=N, guidance=apg, seed=0, output_type="np").images
    assert np.array_equal(a, b)  # a second run does not inherit the first run's buffer
    apg.update(rand(2, 1, 8, 8), rand(2, 1, 8, 8, seed=3))
    apg.begin_run(num_inference_steps=N, start_step=3)
    assert apg.momentum_buffer is None
    # diffusers-driven runs (no begin_run): a step index going back starts a new run
    apg.set_state(step=4, num_inference_steps=N, timestep=0)
    apg.update(rand(2, 1, 8, 8), rand(2, 1, 8, 8, seed=3))
    apg.set_state(step=2, num_inference_steps=N, timestep=0)
    assert apg.momentum_buffer is None
    # a teleported run starts at step k > 0 with a zero buffer
    teleported = digits_like([1, 2], num_inference_steps=N, guidance=apg, seed=0, output_type="latent",
                             teleport=lambda x, **kw: x, teleport_fraction=0.5)
    assert teleported.steps[0]["step"] == 3 and teleported.nfe == 2 * (N - 3)


def test_apg_in_x0_space_differs_from_apg_on_eps(digits_like):
    apg = dict(guidance_scale=6.0, norm_threshold=0.5, momentum=None)
    x0 = digits_like([3], num_inference_steps=N, guidance=APG(**apg), seed=0, output_type="np").images
    eps = digits_like([3], num_inference_steps=N, guidance=APG(**apg), guidance_space="model", seed=0,
                      output_type="np").images
    assert np.abs(x0 - eps).max() > 1e-3
    cfg_x0 = digits_like([3], num_inference_steps=N, guidance_scale=6.0, seed=0, output_type="np").images
    cfg_eps = digits_like([3], num_inference_steps=N, guidance_scale=6.0, guidance_space="model", seed=0,
                          output_type="np").images
    assert np.abs(cfg_x0 - cfg_eps).max() < 1e-4  # CFG is space-invariant


# ---------------------------------------------------------------- AG
def test_ag_never_tripping_is_cfg_bit_for_bit(digits_like):
    ag = AdaptiveGuidance(guidance_scale=3.0, threshold=1.5)
    a = digits_like([1, 5], num_inference_steps=N, guidance=ag, seed=0, output_type="np")
    b = digits_like([1, 5], num_inference_steps=N, guidance=CFG(guidance_scale=3.0), seed=0, output_type="np")
    assert np.array_equal(a.images, b.images) and a.nfe == b.nfe == 2 * N
    gammas = [s["gamma_mean"] for s in a.steps]
    assert len(gammas) == N and all(-1 <= g <= 1 for g in gammas)


LABELS = list(range(10))


@pytest.fixture(scope="module")
def gammas(digits_like):
    """γ_t per step and sample of a never-tripping run (x0 space), to pick thresholds that trip mid-run."""
    probe = AdaptiveGuidance(guidance_scale=3.0, threshold=1.5, space="x0")
    digits_like(LABELS, num_inference_steps=N, guidance=probe, seed=0)
    return torch.stack([probe.gamma_history[i] for i in range(N)]).T  # samples x steps


def trip_step(gamma_row, threshold):
    hits = [j for j, g in enumerate(gamma_row.tolist()) if g >= threshold]
    return hits[0] + 1 if hits else None


def test_ag_trip_equals_static_truncation_with_exact_nfe(digits_like, gammas):
    # a sample and a threshold that trip it at a middle step j (γ_j above all earlier γ)
    choice = [(i, j) for i in range(len(LABELS)) for j in range(1, N - 1) if gammas[i, j] > gammas[i, :j].max()]
    assert choice, "no sample whose γ rises mid-run"
    i, j = choice[0]
    threshold = float(gammas[i, j] + gammas[i, :j].max()) / 2
    ag = AdaptiveGuidance(guidance_scale=3.0, threshold=threshold, space="x0")
    counter = Counter(digits_like.unet)
    try:
        out = digits_like([LABELS[i]], num_inference_steps=N, guidance=ag, seed=i, output_type="np")
    finally:
        counter.close()
    k = j + 1
    assert ag.truncation_step == [k]
    assert out.nfe == counter.rows == 2 * k + (N - k)
    stop = k / N + 1e-9
    assert int(stop * N) == k
    static = digits_like([LABELS[i]], num_inference_steps=N, guidance=CFG(guidance_scale=3.0, stop=stop), seed=i,
                         output_type="np")
    assert np.array_equal(out.images, static.images)


def test_ag_per_sample_truncation_is_batch_independent_and_monotone(digits_like, gammas):
    candidates = sorted(set(gammas[:, 1:].flatten().tolist()))
    best = max(candidates, key=lambda th: len({trip_step(g, th) for g in gammas}))
    expected = [trip_step(g, best) for g in gammas]
    assert len(set(expected)) > 1
    ag = AdaptiveGuidance(guidance_scale=3.0, threshold=best, space="x0")
    counter = Counter(digits_like.unet)
    try:
        out = digits_like(LABELS, num_inference_steps=N, guidance=ag, seed=0, output_type="np")
    finally:
        counter.close()
    assert ag.truncation_step == expected
    nfe = [2 * N if s is None else 2 * s + (N - s) for s in expected]
    assert counter.rows == sum(nfe) and out.nfe == sum(nfe) / len(nfe)
    for i in {expected.index(s) for s in set(expected)}:  # each sample equals its own single-sample run
        alone = AdaptiveGuidance(guidance_scale=3.0, threshold=best, space="x0")
        single = digits_like([LABELS[i]], num_inference_steps=N, guidance=alone, seed=i, output_type="np")
        assert alone.truncation_step == [expected[i]]
        assert np.abs(single.images[0] - out.images[i]).max() < 1e-4
    # batch rule: nobody truncates before the last sample passes
    whole = AdaptiveGuidance(guidance_scale=3.0, threshold=best, space="x0", batch_rule="batch")
    digits_like(LABELS, num_inference_steps=N, guidance=whole, seed=0)
    last = None if None in expected else max(expected)
    assert whole.truncation_step == [last] * len(LABELS)
    # monotone: once passed, γ falling again does not re-enable guidance
    ag = AdaptiveGuidance(guidance_scale=2.0, threshold=0.9, space="input")
    ag.begin_run(num_inference_steps=3)
    x = rand(1, 1, 4, 4)
    ag.set_state(step=0, num_inference_steps=3, timestep=0)
    ag.forward(x, x * 1.01)
    ag.set_state(step=1, num_inference_steps=3, timestep=0)
    assert ag.num_conditions == 1 and ag.forward(x).pred is x


# ---------------------------------------------------------------- LinearAG
def test_least_squares_identity_and_fit():
    y = rand(4, 1, 8, 8)
    coef, r2 = least_squares(y, [rand(4, 1, 8, 8, seed=1), y, torch.ones_like(y)])
    assert np.allclose(coef, [0, 1, 0], atol=1e-9) and r2 > 1 - 1e-12
    eps_c = [rand(8, 1, 4, 4, seed=s) for s in range(4)]
    eps_u = [eps_c[0] * 0.5]
    for s in range(1, 4):  # an exactly affine history: ε_u(i) = 0.8 ε_c(i) + 0.1 ε_u(i-1) + 0.2
        eps_u.append(0.8 * eps_c[s] + 0.1 * eps_u[-1] + 0.2)
    coefs, r2_fit, r2_held = fit_linear_ag_coefficients(eps_c, eps_u, [1, 2, 3])
    assert np.allclose(coefs[2], [0.8, 0, 0.1, 0.2], atol=1e-6) and min(r2_held.values()) > 0.999999


def test_linear_ag_fit_sample_nfe_and_refusals(digits_like, tmp_path):
    record = fit_linear_ag(digits_like, num_inference_steps=N, guidance_scale=3.0, num_samples=20, batch_size=20)
    assert sorted(int(k) for k in record["steps"]) == [1, 2] and record["scheduler"] == "DDIMScheduler"
    path = save_linear_ag(record, tmp_path / "coef.json")
    lag = LinearAG(coefficients=str(path), threshold=1.5)
    assert lag.guidance_scale == 3.0
    counter = Counter(digits_like.unet)
    try:
        out = digits_like([2, 3], num_inference_steps=N, guidance=lag, seed=0, output_type="np")
    finally:
        counter.close()
    assert [s["nfe"] for s in out.steps] == [2, 1, 1, 2, 2, 2]  # 2 CFG, 2 LinearAG, then AG (never trips)
    assert out.nfe == 10 and counter.rows == 20
    cfg = digits_like([2, 3], num_inference_steps=N, guidance_scale=3.0, seed=0, output_type="np").images
    cond_only = digits_like([2, 3], num_inference_steps=N, guidance_scale=1.0, seed=0, output_type="np").images
    assert 0 < np.abs(out.images - cfg).mean() < np.abs(cond_only - cfg).mean()  # nearer CFG than no guidance
    with pytest.raises(ValueError, match="num_inference_steps 5 does not match"):
        digits_like([2], num_inference_steps=5, guidance=lag, seed=0)
    with pytest.raises(ValueError, match="solver DPMSolverMultistepScheduler does not match"):
        digits_like([2], num_inference_steps=N, guidance=lag, solver="dpmsolver++", seed=0)
    with pytest.raises(ValueError, match="guidance_scale 5.0 does not match"):
        LinearAG(guidance_scale=5.0, coefficients=str(path))
    with pytest.raises(ValueError, match="fastgen fit-linear-ag"):
        digits_like([2], num_inference_steps=N, guidance="linear-ag", guidance_scale=3.0, seed=0)


# ---------------------------------------------------------------- protocol, config, pipelines, CLI
@pytest.mark.parametrize("make", [
    lambda: APG(guidance_scale=9.0, eta=0.3, norm_threshold=2.0, momentum=-0.25, norm_dims=[1, 2, 3]),
    lambda: AdaptiveGuidance(guidance_scale=4.0, threshold=0.995, space="x0", batch_rule="batch"),
    lambda: LinearAG(coefficients={"format": "fastgen-linear-ag/1", "num_inference_steps": 4, "guidance_scale": 2.0,
                                   "steps": {"1": [1.0, 0.0, 0.0, 0.0]}}, threshold=0.99),
])
def test_config_round_trip_and_base_class(make, tmp_path):
    from diffusers.guiders import BaseGuidance
    g = make()
    assert isinstance(g, BaseGuidance)
    g.save_pretrained(tmp_path)
    back = type(g).from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(back.config) == public(g.config) and back.guidance_scale == g.guidance_scale
    assert type(back).__name__ == back.config["_class_name"] == type(g).__name__


def test_bad_arguments_name_the_argument():
    for make, match in [(lambda: APG(eta="x"), "eta must be a number"),
                        (lambda: APG(norm_threshold=-1), "norm_threshold must be"),
                        (lambda: APG(momentum=3), "momentum must be"),
                        (lambda: AdaptiveGuidance(space="latent"), r"space must be one of \('eps', 'x0', 'input'\)"),
                        (lambda: AdaptiveGuidance(batch_rule="mean"), "batch_rule must be one of"),
                        (lambda: LinearAG(coefficients={"format": "other"}), "fastgen-linear-ag/1"),
                        (lambda: LinearAG(coefficients=3), "coefficients must be a path, a dict or None"),
                        (lambda: resolve_guidance("apgx", 3.0), r"\['cfg', 'apg', 'ag', 'linear-ag', 'cfg-interval'\]")]:
        with pytest.raises(ValueError, match=match):
            make()
    assert available_guidance() == ["cfg", "apg", "ag", "linear-ag", "cfg-interval"]


@pytest.mark.parametrize("kind, solver", [("sd", "dpmsolver++"), ("sdxl", "unipc")])
def test_text_pipelines_run_every_guidance_with_negative_prompts(sd, sdxl, kind, solver):
    for pipe in [sd if kind == "sd" else FastGenStableDiffusionXLPipeline.from_pipe(sdxl)]:
        cfg = pipe(["a cat", "a dog"], negative_prompt=["blue", "red"], num_inference_steps=4, guidance_scale=5.0,
                   solver=solver, seed=0, output_type="np").images
        for name in ("apg", "ag"):
            out = pipe(["a cat", "a dog"], negative_prompt=["blue", "red"], num_inference_steps=4, guidance=name,
                       guidance_scale=5.0, solver=solver, seed=0, output_type="np")
            assert np.isfinite(out.images).all() and out.nfe <= 8
        ag = AdaptiveGuidance(guidance_scale=5.0, threshold=-1.0)  # trips at step 0 for every sample
        out = pipe(["a cat", "a dog"], negative_prompt=["blue", "red"], num_inference_steps=4, guidance=ag,
                   guidance_scale=5.0, solver=solver, seed=0, output_type="np")
        assert out.nfe == 5 and ag.truncation_step == [1, 1]
        lag = LinearAG(coefficients={"format": "fastgen-linear-ag/1", "num_inference_steps": 4, "guidance_scale": 5.0,
                                     "steps": {"1": [0.0, 0.0, 1.0, 0.0]}}, threshold=1.5)
        out = pipe(["a cat", "a dog"], negative_prompt=["blue", "red"], num_inference_steps=4, guidance=lag,
                   solver=solver, guidance_scale=5.0, seed=0, output_type="np")
        assert out.nfe == 7 and np.isfinite(out.images).all() and np.abs(out.images - cfg).max() > 0


def test_guiders_run_in_diffusers_modular_sdxl_pipeline(sdxl):
    from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks
    mp = StableDiffusionXLAutoBlocks().init_pipeline()
    mp.update_components(**{k: v for k, v in sdxl.components.items() if v is not None})
    mp.set_progress_bar_config(disable=True)
    images = {}
    for name, guider in [("cfg", ClassifierFreeGuidance(guidance_scale=5.0)), ("cfg-fastgen", CFG(guidance_scale=5.0)),
                         ("ag-never", AdaptiveGuidance(guidance_scale=5.0, threshold=1.5)),
                         ("ag-always", AdaptiveGuidance(guidance_scale=5.0, threshold=-1.0)),
                         ("apg", APG(guidance_scale=5.0, norm_threshold=0.5))]:
        mp.update_components(guider=guider)
        counter = Counter(sdxl.unet)
        try:
            images[name] = mp(prompt="a cat", negative_prompt="blue", num_inference_steps=3, height=64, width=64,
                              generator=torch.Generator().manual_seed(0), output="latents")
        finally:
            counter.close()
        images[name + "/rows"] = counter.rows
    assert torch.equal(images["cfg"], images["ag-never"]) and torch.equal(images["cfg"], images["cfg-fastgen"])
    assert images["ag-never/rows"] == 6 and images["ag-always/rows"] == 4
    assert not torch.equal(images["cfg"], images["apg"])


def test_cli_fit_linear_ag(digits_like, tmp_path, capsys):
    folder = tmp_path / "model"
    digits_like.save_pretrained(folder)
    rc = cli_main(["fit-linear-ag", "--model", str(folder), "--steps", "6", "--scale", "3", "--n", "8", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["replaced_steps"] == [1, 2]
    assert summary["output"].startswith(str(folder / "linear_ag"))
    pipe = FastGenClassPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert pipe([1], num_inference_steps=6, guidance="linear-ag", guidance_scale=3.0, seed=0).nfe < 12
    assert cli_main(["fit-linear-ag", "--model", str(folder), "--scale", "1"]) == 2
    assert "--guidance-scale must be a number > 1" in capsys.readouterr().err
