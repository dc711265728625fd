"""Sampling core: noise schedules, denoiser parameterisations, guidance/solver resolution, bad input."""
import importlib.util
import math

import pytest
import torch
from diffusers import (DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler)
from diffusers.models.attention_processor import AttnProcessor2_0

from fastgen import Denoiser, FastGenClassPipeline, NoiseSchedule, set_attention
from fastgen.guidance import CFG, resolve_guidance
from fastgen.solvers import resolve_solver
from tiny import tiny_class_unet


@pytest.fixture(scope="module")
def pipe():
    p = FastGenClassPipeline(scheduler=DPMSolverMultistepScheduler(), unet=tiny_class_unet())
    p.set_progress_bar_config(disable=True)
    return p


# ---------------------------------------------------------------- NoiseSchedule
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_vp_schedule_matches_diffusers_tables(beta_schedule):
    kw = dict(beta_start=0.00085, beta_end=0.012) if beta_schedule == "scaled_linear" else {}
    sched = DDPMScheduler(beta_schedule=beta_schedule, **kw)
    ns = NoiseSchedule.from_scheduler_config(sched.config)
    alpha, sigma = ns.alpha_sigma(torch.arange(1000.0))
    assert torch.allclose(alpha**2, sched.alphas_cumprod.double(), atol=1e-12)
    assert torch.allclose(alpha**2 + sigma**2, torch.ones(1000, dtype=torch.float64))
    t = torch.tensor([0.0, 3.25, 500.5, 999.0], dtype=torch.float64)
    assert torch.allclose(ns.t_from_lambda(ns.lambda_(t)), t, atol=1e-8)


def test_fractional_timesteps_follow_diffusers_sigma_interpolation():
    """Euler/Karras samplers feed fractional timesteps; sigma/alpha must match their sigma table."""
    sched = EulerDiscreteScheduler(use_karras_sigmas=True)
    sched.set_timesteps(7)
    ns = NoiseSchedule.from_scheduler_config(sched.config)
    a, s = ns.alpha_sigma(sched.timesteps.double())
    assert torch.allclose(s / a, sched.sigmas[:-1].double(), rtol=1e-4)


def test_flow_and_edm_closed_forms():
    flow = NoiseSchedule.from_scheduler_config(FlowMatchEulerDiscreteScheduler().config)
    a, s = flow.alpha_sigma(torch.tensor(250.0))
    assert (float(a), float(s)) == (0.75, 0.25)
    assert math.isclose(float(flow.lambda_(250.0)), math.log(3.0))
    assert math.isclose(float(flow.t_from_lambda(math.log(3.0))), 250.0, rel_tol=1e-12)
    edm = NoiseSchedule("edm")
    assert float(edm.alpha_sigma(2.0)[0]) == 1.0 and math.isclose(float(edm.t_from_lambda(edm.lambda_(2.0))), 2.0)
    assert math.isclose(float(edm.timestep_from_t(math.e**4)), 1.0)
    with pytest.raises(ValueError, match="kind must be one of"):
        NoiseSchedule("cosine")
    with pytest.raises(ValueError, match="beta_schedule must be one of"):
        NoiseSchedule.from_scheduler_config({"beta_schedule": "quadratic"})


# ---------------------------------------------------------------- Denoiser
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample", "flow"])
def test_denoiser_conversions_invert_and_agree_with_forward_process(prediction_type):
    sched = FlowMatchEulerDiscreteScheduler() if prediction_type == "flow" else DDPMScheduler(prediction_type=prediction_type)
    den = Denoiser.from_scheduler(tiny_class_unet(), sched)
    assert den.prediction_type == prediction_type
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64), torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor(300.0)
    a, s = den.alpha_sigma(t, x0)
    x = a * x0 + s * eps
    raw = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0, "flow": eps - x0}[prediction_type]
    x0_hat, eps_hat = den.to_x0_eps(raw, x, t)
    assert torch.allclose(x0_hat, x0, atol=1e-10) and torch.allclose(eps_hat, eps, atol=1e-10)
    assert torch.allclose(den.from_x0(x0, x, t), raw, atol=1e-10)


def test_denoiser_rejects_unknown_models_and_types():
    with pytest.raises(TypeError, match="model must be a diffusers UNet2DModel"):
        Denoiser(torch.nn.Linear(2, 2), NoiseSchedule("edm"))
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        Denoiser(tiny_class_unet(), NoiseSchedule("edm"), "score")


# ---------------------------------------------------------------- guidance and solvers
def test_guidance_resolution():
    assert resolve_guidance(None, 1.0) is None
    g = resolve_guidance(None, 4.0)
    assert isinstance(g, CFG) and g.guidance_scale == 4.0
    mine = CFG(guidance_scale=2.0)
    assert resolve_guidance(mine, 9.0) is mine
    with pytest.raises(ValueError, match=r"guidance must be None, one of \['cfg'"):
        resolve_guidance("pag", 3.0)
    with pytest.raises(TypeError, match="guidance_scale must be a number"):
        resolve_guidance("cfg", "high")


def test_cfg_guider_formula_and_config_roundtrip(tmp_path):
    g = CFG(guidance_scale=3.0, start=0.2)
    c, u = torch.randn(4), torch.randn(4)
    assert torch.allclose(g.forward(pred_cond=c, pred_uncond=u).pred, u + 3.0 * (c - u))
    g.save_pretrained(tmp_path)
    back = CFG.from_pretrained(tmp_path)
    assert back.guidance_scale == 3.0 and back._start == 0.2
    back.set_state(step=1, num_inference_steps=10, timestep=torch.tensor(900))
    assert back.num_conditions == 1  # before the start fraction: conditional only
    back.set_state(step=2, num_inference_steps=10, timestep=torch.tensor(800))
    assert back.num_conditions == 2


def test_limited_interval_cfg_counts_nfe(pipe):
    out = pipe([1], num_inference_steps=10, seed=0, guidance=CFG(guidance_scale=3.0, start=0.3))
    assert out.nfe == 3 * 1 + 7 * 2
    assert [s["nfe"] for s in out.steps] == [1, 1, 1] + [2] * 7


def test_solver_resolution():
    base = DPMSolverMultistepScheduler(beta_schedule="scaled_linear")
    assert resolve_solver(None, base) is base
    euler = resolve_solver("euler", base)
    assert type(euler).__name__ == "EulerDiscreteScheduler" and euler.config.beta_schedule == "scaled_linear"
    with pytest.raises(ValueError, match=r"solver must be None .* one of \[.*rk45"):
        resolve_solver("rk45", base)


# ---------------------------------------------------------------- attention
def test_attention_modes(pipe):
    assert set_attention(pipe, "sdpa") == "sdpa"
    from diffusers.models.attention_processor import Attention, AttnProcessor

    attns = [m for m in pipe.unet.modules() if isinstance(m, Attention)]
    for m in attns:
        m.set_processor(AttnProcessor())
    assert set_attention(pipe, "sdpa") == "sdpa"
    assert attns and all(isinstance(m.processor, AttnProcessor2_0) for m in attns)
    assert set_attention(pipe, "auto") in ("sdpa", "xformers")
    with pytest.raises(ValueError, match="attention must be one of"):
        set_attention(pipe, "flash")


@pytest.mark.skipif(torch.cuda.is_available() and importlib.util.find_spec("xformers") is not None,
                    reason="xformers can run here")
def test_xformers_without_cuda_is_a_clear_error(pipe, tmp_path):
    with pytest.raises(ValueError, match="attention='xformers' cannot run here"):
        pipe.set_attention("xformers")
    pipe.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="attention='xformers' cannot run here"):
        FastGenClassPipeline.from_pretrained(tmp_path, attention="xformers")


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, message", [
    (dict(num_inference_steps=0), "num_inference_steps must be a positive integer"),
    (dict(num_inference_steps=-3), "num_inference_steps must be a positive integer"),
    (dict(num_inference_steps=2.5), "num_inference_steps must be a positive integer"),
    (dict(guidance="apg-typo"), "guidance must be None, one of"),
    (dict(solver="rk45"), "solver must be None"),
    (dict(class_labels=[10]), r"class_labels entries must be class ids in \[0, 10\)"),
    (dict(class_labels=[-1]), r"class_labels entries must be class ids"),
    (dict(class_labels=[True]), r"class_labels entries must be class ids"),
    (dict(class_labels=["seven"]), "class_labels names"),
    (dict(class_labels=None), "class_labels is required"),
    (dict(latents=torch.zeros(1, 1, 4, 4)), r"latents must have shape \(1, 1, 8, 8\)"),
    (dict(output_type="jpeg"), "output_type must be one of"),
    (dict(guidance_space="eps"), "guidance_space must be one of"),
    (dict(teleport_fraction=1.0), r"teleport_fraction must be a number in \[0, 1\)"),
    (dict(seed=[1, 2]), r"seed must list one seed per image \(1\)"),
    (dict(callback_on_step_end_tensor_inputs=["noise_pred"]), "callback_on_step_end_tensor_inputs must be among"),
])
def test_bad_call_arguments_fail_before_sampling(pipe, kwargs, message):
    calls = []
    hook = pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises((ValueError, TypeError), match=message):
            pipe(**{"class_labels": [1], **kwargs})
    finally:
        hook.remove()
    assert calls == []  # failed before any network evaluation


def test_missing_component_is_a_clear_error():
    with pytest.raises(ValueError, match="needs exactly one network"):
        FastGenClassPipeline(scheduler=DPMSolverMultistepScheduler())


def test_sd3_transformer_flow_loop_matches_hand_written_loop():
    """SD3's transformer with flow matching: sample_loop (x0-space CFG) equals the stock recipe."""
    from diffusers import SD3Transformer2DModel

    from fastgen.denoiser import GuidedDenoiser
    from fastgen.sampling import sample_loop

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                  pooled_projection_dim=8, out_channels=4).eval()
    g = torch.Generator().manual_seed(1)
    text, pooled = torch.randn(2, 5, 16, generator=g), torch.randn(2, 8, generator=g)
    neg_text, neg_pooled = torch.randn(2, 5, 16, generator=g), torch.randn(2, 8, generator=g)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    scale, steps = 4.0, 4

    ref_sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref_sched.set_timesteps(steps)
    x = noise.clone()
    with torch.no_grad():
        for t in ref_sched.timesteps:
            out = model(hidden_states=torch.cat([x, x]), timestep=t.expand(4),
                        encoder_hidden_states=torch.cat([neg_text, text]),
                        pooled_projections=torch.cat([neg_pooled, pooled])).sample
            u, c = out.chunk(2)
            x = ref_sched.step(u + scale * (c - u), t, x).prev_sample

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(steps)
    den = Denoiser.from_scheduler(model, sched)
    assert den.prediction_type == "flow" and den.schedule.kind == "flow"
    cond = {"encoder_hidden_states": text, "pooled_projections": pooled}
    uncond = {"encoder_hidden_states": neg_text, "pooled_projections": neg_pooled}
    with torch.no_grad():
        res = sample_loop(GuidedDenoiser(den, CFG(guidance_scale=scale), cond, uncond), noise.clone(), sched)
    assert torch.allclose(res.latents, x, atol=1e-4)
    assert res.nfe == 2 * steps

    # The project's own flow USFScheduler drives the same loop (one flow-detection rule everywhere); with the
    # flow UniPC preset it reproduces diffusers' flow-mode UniPC on the same model.
    from diffusers import UniPCMultistepScheduler

    from fastgen.solvers import USFScheduler

    usf = USFScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config, preset="usf-unipc-bh2-2p")
    den_usf = Denoiser.from_scheduler(model, usf)
    assert den_usf.prediction_type == "flow" and den_usf.schedule.kind == "flow"
    stock = UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0,
                                    solver_type="bh2", disable_corrector=list(range(steps)))
    outs = []
    for sch in (usf, stock):
        sch.set_timesteps(steps)
        with torch.no_grad():
            outs.append(sample_loop(GuidedDenoiser(Denoiser.from_scheduler(model, sch), CFG(guidance_scale=scale),
                                                   cond, uncond), noise.clone(), sch).latents)
    assert torch.isfinite(outs[0]).all()
    assert torch.allclose(outs[0], outs[1], atol=1e-4)


# ---------------------------------------------------------------- Parameterization / GuidedDenoiser
@pytest.mark.parametrize("name", ["epsilon", "v_prediction", "sample", "flow"])
def test_parameterization_round_trip_closed_form(name):
    """x_t = a x0 + s eps: the network output of each parameterisation maps back to (x0, eps) exactly."""
    from fastgen import Parameterization

    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, generator=g, dtype=torch.float64), torch.randn(3, 2, generator=g, dtype=torch.float64)
    a = torch.tensor([[0.9], [0.5], [0.2]], dtype=torch.float64)
    s = 1 - a if name == "flow" else torch.sqrt(1 - a**2)
    x = a * x0 + s * eps
    out = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0, "flow": eps - x0}[name]
    p = Parameterization(name)
    got_x0, got_eps = p.to_x0_eps(out, x, a, s)
    assert torch.allclose(got_x0, x0, atol=1e-12) and torch.allclose(got_eps, eps, atol=1e-12)
    assert torch.allclose(p.to_x0(out, x, a, s), x0, atol=1e-12)
    assert torch.allclose(p.from_x0(x0, x, a, s), out, atol=1e-12)
    assert Parameterization("flow_prediction") == Parameterization("flow")
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        Parameterization("score")


def test_guided_denoiser_per_row_times_and_autograd():
    """Training use: one time per row, CFG in one batch (2 NFE per row), gradients reach the network; rows are
    independent of their batch-mates (batch of 3 == three batches of 1)."""
    from fastgen.denoiser import GuidedDenoiser
    from fastgen.guidance import APG, CFG

    sched = DDPMScheduler(num_train_timesteps=1000)
    net = tiny_class_unet()
    den = Denoiser.from_scheduler(net, sched)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 8, 8, generator=g)
    t = torch.tensor([10, 500, 990])
    labels = torch.tensor([0, 1, 2])
    null = torch.full_like(labels, 10)
    for guider in (CFG(guidance_scale=2.0), APG(guidance_scale=2.0, norm_threshold=0.0)):
        gd = GuidedDenoiser(den, guider)
        pred = gd(x, t, cond={"class_labels": labels}, uncond={"class_labels": null})
        assert pred.nfe_per_row.tolist() == [2, 2, 2]
        rows = [gd(x[i:i + 1], t[i:i + 1], cond={"class_labels": labels[i:i + 1]},
                   uncond={"class_labels": null[i:i + 1]}).model_output for i in range(3)]
        assert torch.allclose(pred.model_output, torch.cat(rows), atol=1e-5)
        # x0 of the guided output is consistent with the forward process at each row's own time
        a, s = den.alpha_sigma(t, x)
        assert a.shape == (3, 1, 1, 1) and torch.allclose(a * pred.x0 + s * pred.eps, x, atol=1e-5)
    fake = GuidedDenoiser(den)
    loss = fake(x, t, cond={"class_labels": labels}).x0.square().mean()
    loss.backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    assert fake(x, t, cond={"class_labels": labels}).nfe_per_row.tolist() == [1, 1, 1]


# ---------------------------------------------------------------- bad input before work, no silent garbage
@pytest.fixture(scope="module")
def digits_pipe():
    import fastgen

    pipe = fastgen.load_builtin("digits")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("kwargs, match", [
    ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number >= 0"),
    ({"guidance_scale": float("inf")}, "guidance_scale must be a finite number >= 0"),
    ({"guidance_scale": -5.0}, "guidance_scale must be a finite number >= 0"),
    ({"guidance_scale": "3"}, "guidance_scale must be a number"),
    ({"num_inference_steps": 5000}, "num_inference_steps must be at most the scheduler's num_train_timesteps"),
    ({"num_inference_steps": 0}, "num_inference_steps must be a positive integer"),
    ({"teleport_fraction": 1.5}, "teleport_fraction must be a number in"),
    ({"guidance_space": "eps"}, "guidance_space must be one of"),
])
def test_bad_call_arguments_fail_before_the_network_runs(digits_pipe, monkeypatch, kwargs, match):
    def boom(*a, **k):
        raise AssertionError("the network ran before the arguments were checked")

    monkeypatch.setattr(digits_pipe.unet, "forward", boom)
    with pytest.raises((ValueError, TypeError), match=match):
        digits_pipe(class_labels=[1], **{"num_inference_steps": 2, **kwargs})


def test_huge_guidance_scale_warns(digits_pipe):
    with pytest.warns(UserWarning, match="far above the usual range"):
        digits_pipe(class_labels=[1], num_inference_steps=1, guidance_scale=1e30, output_type="latent")


def test_nan_network_output_is_an_error_naming_the_step(digits_pipe, monkeypatch):
    """A model whose output turns NaN (broken weights) must not write a black grid and exit 0."""
    from fastgen.sampling import NonFiniteError

    real = digits_pipe.unet.forward
    calls = {"n": 0}

    def nan_after_two(*a, **k):
        out = real(*a, **k)
        calls["n"] += 1
        if calls["n"] > 2:
            out = (out[0] * float("nan"),)
        return out

    monkeypatch.setattr(digits_pipe.unet, "forward", nan_after_two)
    with pytest.raises(NonFiniteError, match=r"NaN/inf at step 2 \(timestep"):
        digits_pipe(class_labels=[1], num_inference_steps=4, output_type="latent")


def test_guided_denoiser_under_bf16_autocast_matches_fp32():
    """The trainers run the teacher and the fake score in bf16 autocast: same call, close to fp32, grads flow."""
    from fastgen.denoiser import GuidedDenoiser
    from fastgen.guidance import CFG

    den = Denoiser.from_scheduler(tiny_class_unet(), DDPMScheduler(num_train_timesteps=1000))
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 600])
    cond, uncond = {"class_labels": torch.tensor([1, 2])}, {"class_labels": torch.tensor([10, 10])}
    gd = GuidedDenoiser(den, CFG(guidance_scale=2.0), cond, uncond)
    ref = gd(x, t).model_output
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gd(x, t)
        loss = out.x0.float().square().mean()
    loss.backward()
    assert out.nfe_per_row.tolist() == [2, 2]
    assert torch.allclose(out.model_output.float(), ref, atol=0.1, rtol=0.05)
    assert any(p.grad is not None for p in den.parameters())
