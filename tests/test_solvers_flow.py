"""USFScheduler on flow-matching (rectified-flow) models: presets reproduce diffusers' flow-mode
DPM-Solver++ / UniPC, stock SD3 pipeline, save/load, errors.

The analytic model is the exact velocity of Gaussian data N(mu, U diag(l) U^T) under x_t = (1 - s) x0 + s eps
(network time t = 1000 s): E[x0 | x_t] is linear in x_t, so no network noise hides a solver mismatch.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       StableDiffusion3Pipeline, UniPCMultistepScheduler)
from transformers import CLIPTextModelWithProjection

from fastgen.solvers import SolverSchedule, USFScheduler
from fastgen.solvers.usf import FLOW_PRESETS, is_flow_config, preset_schedule, reference_scheduler
from fastgen.teleport import GaussianStats

sys.path.insert(0, str(Path(__file__).parent))
from tiny import _clip_config, tiny_vae, write_clip_tokenizer  # noqa: E402

torch.set_num_threads(1)
TOL = 1e-4
D = 16


def sd3_config(**over):
    """SD3-style: static shift 3."""
    return FlowMatchEulerDiscreteScheduler(shift=3.0, **over).config


def flux_config(**over):
    """Flux-style: dynamic (resolution-dependent) shift, passed to set_timesteps as ``mu``."""
    return FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           **over).config


CONFIGS = {"sd3": (sd3_config, {}), "flux": (flux_config, {"mu": 0.8})}


@pytest.fixture(scope="module")
def gaussian():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    return GaussianStats(torch.randn(D, generator=g, dtype=torch.float64) * 0.5,
                         torch.tensor([4.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64), u[:, :5], 0.0)


def velocity(stats, x, t):
    """Exact v = E[eps - x0 | x_t] at network time t (sigma = t / 1000), for Gaussian data."""
    s = float(t) / 1000.0
    a = 1.0 - s
    xd = x.double()
    coef = a * stats.eigenvalues / (a * a * stats.eigenvalues + s * s)
    x0 = stats.mean + (coef * ((xd - a * stats.mean) @ stats.eigenvectors)) @ stats.eigenvectors.T
    return ((xd - a * x0) / s - x0).to(x.dtype)


def trajectory(stats, scheduler, n, x, **kw):
    """A diffusers-protocol loop; returns the sample after every step."""
    scheduler.set_timesteps(n, **kw)
    out = []
    for t in scheduler.timesteps:
        x = scheduler.step(velocity(stats, x, t), t, x, return_dict=False)[0]
        out.append(x)
    return out


def start():
    return torch.randn(4, D, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- exact reproduction (analytic model)
EXACT = ["usf-dpmsolver++-2m", "usf-dpmsolver++-2m-heun", "usf-unipc-bh2-2p", "usf-unipc-bh2-1pc",
         "usf-unipc-bh2-2pc"]


@pytest.mark.parametrize("cfg_name", sorted(CONFIGS))
@pytest.mark.parametrize("name", EXACT)
def test_flow_presets_reproduce_diffusers(gaussian, name, cfg_name):
    make, kw = CONFIGS[cfg_name]
    cfg = make()
    for n in (5, 12):
        ref = trajectory(gaussian, reference_scheduler(name, cfg, n), n, start(), **kw)[-1]
        usf = trajectory(gaussian, USFScheduler.from_config(cfg, preset=name), n, start(), **kw)[-1]
        assert torch.isfinite(ref).all()
        assert (ref - usf).abs().max() <= TOL, (name, cfg_name, n, float((ref - usf).abs().max()))


@pytest.mark.parametrize("name", ["usf-unipc-bh1-2p", "usf-unipc-bh1-1pc", "usf-unipc-bh1-2pc"])
def test_flow_unipc_bh1_matches_until_diffusers_nans(gaussian, name):
    """diffusers' UniPC bh1 divides by B(h) = -h = -inf on the last step to sigma 0 and returns NaN (in VP
    too); every step before it matches, and the USF version ends finite (order-1 limit)."""
    cfg = sd3_config()
    ref = trajectory(gaussian, reference_scheduler(name, cfg, 8), 8, start())
    usf = trajectory(gaussian, USFScheduler.from_config(cfg, preset=name), 8, start())
    assert not torch.isfinite(ref[-1]).all()
    for r, u in zip(ref[:-1], usf[:-1]):
        assert (r - u).abs().max() <= TOL
    assert torch.isfinite(usf[-1]).all()


def test_flow_presets_change_the_result(gaussian):
    """The reproduction test can fail: the grids and decisions differ visibly between presets."""
    outs = [trajectory(gaussian, USFScheduler.from_config(sd3_config(), preset=p), 5, start())[-1]
            for p in ("usf-dpmsolver++-2m", "usf-dpmsolver++-2m-heun", "usf-unipc-bh2-2p", "usf-default")]
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert (outs[i] - outs[j]).abs().max() > 1e-3


def test_flow_network_gets_diffusers_timesteps_and_exact_sigmas():
    """diffusers' flow-mode solvers give the network int64(sigma * 1000) but step with the exact sigma."""
    cfg = sd3_config()
    for name in ("usf-dpmsolver++-2m", "usf-unipc-bh2-2p"):
        ref = reference_scheduler(name, cfg, 7)
        ref.set_timesteps(7)
        sc = USFScheduler.from_config(cfg, preset=name)
        sc.set_timesteps(7)
        assert sc.timesteps.dtype == torch.int64 and sc.timesteps.tolist() == ref.timesteps.tolist()
        assert torch.allclose(sc.sigmas, ref.sigmas, atol=1e-7)


def test_flow_custom_sigmas_like_stock_pipelines(gaussian):
    """SD3/Flux pass ``sigmas=linspace(1, 1/n, n)`` to schedulers that accept them: UniPC shifts them;
    the DPM-Solver preset (diffusers' DPM takes no sigmas) gets the same shifted grid."""
    sigmas = [1.0 - 0.85 * i / 5 for i in range(6)]
    name = "usf-unipc-bh2-2p"
    ref = UniPCMultistepScheduler.from_config(sd3_config(), use_flow_sigmas=True, prediction_type="flow_prediction",
                                              flow_shift=3.0, solver_type="bh2", disable_corrector=list(range(6)))
    x_ref = trajectory_sigmas(gaussian, ref, sigmas)
    sc = USFScheduler.from_config(sd3_config(), preset=name)
    x_usf = trajectory_sigmas(gaussian, sc, sigmas)
    assert (x_ref - x_usf).abs().max() <= TOL
    assert torch.allclose(sc.sigmas, ref.sigmas)
    dpm = USFScheduler.from_config(sd3_config(), preset="usf-dpmsolver++-2m")
    dpm.set_timesteps(sigmas=sigmas)
    assert torch.allclose(dpm.sigmas, ref.sigmas) and dpm.timesteps.tolist() == ref.timesteps.tolist()


def trajectory_sigmas(stats, scheduler, sigmas):
    scheduler.set_timesteps(sigmas=np.array(sigmas))  # as SD3/Flux pass them
    x = start()
    for t in scheduler.timesteps:
        x = scheduler.step(velocity(stats, x, t), t, x, return_dict=False)[0]
    return x


@pytest.mark.parametrize("order,corrector,expected", [(1, "none", 1), (2, "none", 2), (3, "none", 3), (1, "pseudo", 2)])
def test_flow_update_converges_to_the_closed_form(gaussian, order, corrector, expected):
    """On a logSNR-uniform flow grid (sigma 0.999 -> 0.05), USF steps converge to the closed-form Gaussian
    flow at their order (observed error ratio 24 -> 48 steps)."""
    from fastgen.schedule import NoiseSchedule
    from fastgen.solvers import StepDecision
    from fastgen.teleport import teleport
    ns = NoiseSchedule("flow")
    errs = []
    for n in (12, 24, 48):
        lam = torch.linspace(float(ns.lambda_(999.0)), float(ns.lambda_(50.0)), n + 1, dtype=torch.float64)
        times = [float(t) for t in ns.t_from_lambda(lam)]
        steps = [StepDecision("data", min(order, i + 1), "unipc-bh2" if min(order, i + 1) == 2 else "none",
                              corrector=corrector) for i in range(n)]
        sched = SolverSchedule(times[:-1], steps, final_timestep=times[-1])
        sc = USFScheduler.from_config(sd3_config(), schedule=sched)
        y = trajectory(gaussian, sc, None, start().double())[-1]
        s0, s1 = times[0] / 1000, times[-1] / 1000
        exact = teleport(start().double(), gaussian, alpha_from=1 - s0, sigma_from=s0, alpha_to=1 - s1, sigma_to=s1)
        errs.append(float((y - exact).abs().max()))
    assert errs[2] < errs[1] < errs[0], errs
    assert errs[1] / errs[2] > 2 ** expected * 0.85, errs


def test_flow_default_preset_runs(gaussian):
    sc = USFScheduler.from_config(flux_config(), preset="usf-default")
    y = trajectory(gaussian, sc, 8, start(), mu=0.9)[-1]
    assert torch.isfinite(y).all() and sc.timesteps.dtype == torch.float32  # exact times, as FlowMatchEuler
    assert float(sc.sigmas[0]) > 0.999 and float(sc.sigmas[-1]) == 0.0


def test_fixed_flow_schedule_runs_and_round_trips(gaussian, tmp_path):
    """A flow SolverSchedule (here a preset's, with its recorded network timesteps) runs as a fixed
    schedule and survives JSON."""
    sched = preset_schedule("usf-unipc-bh2-2pc", 6, sd3_config())
    assert sched.meta["network_timesteps"][0] == 999.0 and sched.timesteps[0] > 999.0
    sched.save(tmp_path / "s.json")
    sc = USFScheduler.from_config(sd3_config(), schedule=tmp_path / "s.json")
    a = trajectory(gaussian, sc, 6, start())[-1]
    b = trajectory(gaussian, USFScheduler.from_config(sd3_config(), preset="usf-unipc-bh2-2pc"), 6, start())[-1]
    assert (a - b).abs().max() == 0
    sc.set_timesteps(6, mu=0.5)  # a fixed schedule keeps its own grid; pipelines may still pass mu


# ---------------------------------------------------------------- stock diffusers pipeline
def tiny_sd3(tmp_path, scheduler) -> StableDiffusion3Pipeline:
    """A random-weight SD3 pipeline from configs (no T5: SD3 runs with text_encoder_3=None)."""
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
                                        joint_attention_dim=32, pooled_projection_dim=32).eval()
    torch.manual_seed(2)
    te1 = CLIPTextModelWithProjection(_clip_config()).eval()
    torch.manual_seed(3)
    te2 = CLIPTextModelWithProjection(_clip_config()).eval()
    tok = write_clip_tokenizer(tmp_path / "tok")
    vae = tiny_vae()
    vae.register_to_config(shift_factor=0.0)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=te1,
                                    tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok, text_encoder_3=None,
                                    tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("cfg_name", ["sd3", "flux"])
def test_stock_sd3_pipeline_with_usf_matches_reference(tmp_path, cfg_name):
    """StableDiffusion3Pipeline with USFScheduler swapped in gives the reference solver's latents; with a
    dynamic-shift config the pipeline computes ``mu`` from the config keys USFScheduler keeps."""
    cfg = CONFIGS[cfg_name][0]()
    pipe = tiny_sd3(tmp_path, FlowMatchEulerDiscreteScheduler.from_config(cfg))
    kw = dict(prompt=["a cat"], num_inference_steps=5, guidance_scale=5.0, output_type="latent", height=16,
              width=16, max_sequence_length=8)
    flow = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=float(cfg["shift"]))
    refs = {"usf-dpmsolver++-2m": DPMSolverMultistepScheduler.from_config(cfg, **flow),
            "usf-unipc-bh2-2p": UniPCMultistepScheduler.from_config(cfg, solver_type="bh2",
                                                                    disable_corrector=list(range(5)), **flow)}
    outs = []
    for name, ref in refs.items():
        pipe.scheduler = ref
        expect = pipe(generator=torch.Generator().manual_seed(0), **kw).images
        pipe.scheduler = USFScheduler.from_config(cfg, preset=name)
        got = pipe(generator=torch.Generator().manual_seed(0), **kw).images
        assert (expect - got).abs().max() <= TOL, (name, float((expect - got).abs().max()))
        outs.append(got)
    assert (outs[0] - outs[1]).abs().max() > 1e-3  # the two solvers differ, so the match means something
    images = pipe(generator=torch.Generator().manual_seed(0), **{**kw, "output_type": "np"}).images
    assert images.shape == (1, 16, 16, 3)


# ---------------------------------------------------------------- config detection, save/load
@pytest.mark.parametrize("source", ["flowmatch", "dpm", "unipc"])
def test_flow_detected_from_configs(source):
    fm = sd3_config(use_dynamic_shifting=True, base_image_seq_len=64)
    cfg = {"flowmatch": fm,
           "dpm": DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                              flow_shift=3.0, use_dynamic_shifting=True).config,
           "unipc": UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                            flow_shift=3.0, use_dynamic_shifting=True).config}[source]
    assert is_flow_config(cfg)
    sc = USFScheduler.from_config(cfg, preset="usf-unipc-bh2-2p")
    assert sc.is_flow and sc.config.use_flow_sigmas and sc.config.prediction_type == "flow_prediction"
    assert sc.config.flow_shift == 3.0 and sc.config.use_dynamic_shifting
    assert sc.noise_schedule.kind == "flow"
    if source == "flowmatch":
        assert sc.config.base_image_seq_len == 64  # stock pipelines read these to compute mu


def test_vp_configs_stay_vp():
    sc = USFScheduler.from_config(DPMSolverMultistepScheduler().config, preset="usf-deis-2")
    assert not sc.is_flow and sc.noise_schedule.kind == "vp_discrete"
    assert not any(k in sc.base_config() for k in ("use_flow_sigmas", "flow_shift", "use_dynamic_shifting"))


def test_save_pretrained_keeps_flow_mode(gaussian, tmp_path):
    cfg = flux_config(base_image_seq_len=64)
    sc = USFScheduler.from_config(cfg, preset="usf-dpmsolver++-2m")
    sc.save_pretrained(tmp_path / "sched")
    saved = json.loads((tmp_path / "sched" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "USFScheduler" and saved["use_flow_sigmas"] is True
    assert saved["prediction_type"] == "flow_prediction" and saved["use_dynamic_shifting"] is True
    assert saved["base_image_seq_len"] == 64 and saved["preset"] == "usf-dpmsolver++-2m"
    back = USFScheduler.from_pretrained(tmp_path / "sched")
    assert back.is_flow
    assert {k: v for k, v in back.config.items() if not k.startswith("_")} == \
        {k: v for k, v in sc.config.items() if not k.startswith("_")}
    a = trajectory(gaussian, sc, 6, start(), mu=0.7)[-1]
    b = trajectory(gaussian, back, 6, start(), mu=0.7)[-1]
    assert (a - b).abs().max() == 0


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("preset", ["usf-deis-2", "usf-deis-3", "usf-ddim", "usf-dpmsolver-2m",
                                    "usf-dpmsolver-2m-heun"])
def test_presets_without_flow_mode_raise(preset):
    with pytest.raises(ValueError, match=f"preset '{preset}' has no flow-matching mode.*usf-dpmsolver\\+\\+-2m"):
        USFScheduler.from_config(sd3_config(), preset=preset)
    with pytest.raises(ValueError, match="has no flow-matching mode"):
        preset_schedule(preset, 5, sd3_config())


def test_bad_flow_combinations_are_clear_value_errors():
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        USFScheduler.from_config(sd3_config(use_karras_sigmas=True), preset="usf-dpmsolver++-2m")
    with pytest.raises(ValueError, match="invert_sigmas"):
        USFScheduler.from_config(sd3_config(invert_sigmas=True), preset="usf-dpmsolver++-2m")
    with pytest.raises(ValueError, match="prediction_type='flow_prediction'"):
        USFScheduler(use_flow_sigmas=True, prediction_type="epsilon")
    with pytest.raises(ValueError, match="only supported in flow-matching mode"):
        USFScheduler(preset="usf-dpmsolver++-2m").set_timesteps(sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="needs `mu`"):
        USFScheduler.from_config(flux_config(), preset="usf-unipc-bh2-2p").set_timesteps(5)
    with pytest.raises(ValueError, match="needs use_dynamic_shifting"):
        USFScheduler.from_config(sd3_config(), preset="usf-dpmsolver++-2m").set_timesteps(5, mu=0.5)
    with pytest.raises(ValueError, match="zero-length"):
        USFScheduler.from_config({**sd3_config(), "final_sigmas_type": "sigma_min"},
                                 preset="usf-unipc-bh2-2p").set_timesteps(5)
    sched = SolverSchedule([900.0, 500.0], [{"prediction": "data", "order": 1}] * 2)
    with pytest.raises(ValueError, match="fixed schedule"):
        USFScheduler.from_config(sd3_config(), schedule=sched).set_timesteps(sigmas=[1.0, 0.5])
