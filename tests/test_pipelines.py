"""FastGen pipelines against stock diffusers: equivalence, loading routes, seeds, NFE, callbacks."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DiffusionPipeline, DiTPipeline, DPMSolverMultistepScheduler,
                       EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline,
                       UniPCMultistepScheduler)

from fastgen import FastGenClassPipeline, FastGenStableDiffusionPipeline, FastGenStableDiffusionXLPipeline
from tiny import tiny_class_unet, tiny_dit, tiny_sd, tiny_sdxl, tiny_vae

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a cat", "a red dog"]
NEG = ["blue", "photo of a tree"]


def gens(n, start=0):
    return [torch.Generator().manual_seed(start + i) for i in range(n)]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return tiny_sd(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return tiny_sdxl(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def dit():
    pipe = DiTPipeline(transformer=tiny_dit(), vae=tiny_vae(), scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def digits_like():
    pipe = FastGenClassPipeline(scheduler=DPMSolverMultistepScheduler(), unet=tiny_class_unet(),
                                id2label={i: str(i) for i in range(10)})
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------- stock-diffusers equivalence
@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler])
@pytest.mark.parametrize("scale", [1.0, 7.5])
def test_sd_matches_stock(sd, scheduler_cls, scale):
    stock = StableDiffusionPipeline.from_pipe(sd, scheduler=scheduler_cls.from_config(sd.scheduler.config))
    stock.set_progress_bar_config(disable=True)
    fg = FastGenStableDiffusionPipeline.from_pipe(stock)
    fg.set_progress_bar_config(disable=True)
    ref = stock(PROMPTS, negative_prompt=NEG, num_inference_steps=5, guidance_scale=scale, generator=gens(2),
             output_type="np").images
    out = fg(PROMPTS, negative_prompt=NEG, num_inference_steps=5, guidance_scale=scale, guidance="cfg" if scale > 1 else None,
             seed=0, output_type="np")
    assert np.abs(out.images - ref).max() <= 1e-4
    assert ref.std() > 0.01  # the comparison is not between two blank images


@pytest.mark.parametrize("scale", [1.0, 5.0])
def test_sdxl_matches_stock(sdxl, scale):
    fg = FastGenStableDiffusionXLPipeline.from_pipe(sdxl)
    fg.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=4, guidance_scale=scale, height=16, width=16, output_type="np", negative_prompt=NEG)
    ref = sdxl(PROMPTS, generator=gens(2), **kw).images
    out = fg(PROMPTS, seed=0, guidance="cfg" if scale > 1 else None, **kw)
    assert np.abs(out.images - ref).max() <= 1e-4
    assert out.nfe == (8 if scale > 1 else 4)


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_class_pipeline_matches_dit(dit, scale):
    fg = FastGenClassPipeline.from_pipe(dit)
    fg.set_progress_bar_config(disable=True)
    ref = dit([1, 7, 400], num_inference_steps=6, guidance_scale=scale, generator=gens(3), output_type="np").images
    out = fg([1, 7, 400], num_inference_steps=6, guidance_scale=scale, seed=0, output_type="np")
    assert np.abs(out.images - ref).max() <= 1e-4
    assert out.nfe == 6 * (2 if scale > 1 else 1)


def test_class_unet_matches_hand_written_cfg_loop(digits_like):
    """UNet2DModel path against a few lines of plain diffusers: eps CFG, DPM-Solver++ steps."""
    labels, scale, steps = torch.tensor([3, 0, 9]), 2.5, 7
    sched = DPMSolverMultistepScheduler.from_config(digits_like.scheduler.config)
    sched.set_timesteps(steps)
    x = torch.cat([torch.randn(1, 1, 8, 8, generator=g) for g in gens(3, start=10)])
    for t in sched.timesteps:
        eps = digits_like.unet(torch.cat([x, x]), t, class_labels=torch.cat([torch.full_like(labels, 10), labels])).sample
        eps_u, eps_c = eps.chunk(2)
        x = sched.step(eps_u + scale * (eps_c - eps_u), t, x).prev_sample
    # The random tiny UNet drives raw samples to |x| ~ 450, so compare them relative to float32 precision.
    out = digits_like(labels, num_inference_steps=steps, guidance_scale=scale, seed=10, output_type="latent")
    assert torch.allclose(out.images, x, rtol=1e-5, atol=1e-4)
    assert out.nfe == 2 * steps


# ---------------------------------------------------------------- seeds, NFE, solvers, callbacks
def test_sample_depends_on_seed_not_batch(digits_like, sd):
    big = digits_like([1, 2, 3, 4], num_inference_steps=4, seed=[5, 6, 7, 8], output_type="pt").images
    alone = digits_like([3], num_inference_steps=4, seed=[7], output_type="pt").images
    assert torch.allclose(big[2], alone[0], atol=1e-6)
    fg = FastGenStableDiffusionPipeline.from_pipe(sd, scheduler=DDIMScheduler.from_config(sd.scheduler.config))
    a = fg(PROMPTS, num_inference_steps=3, seed=[11, 12], output_type="np").images
    b = fg(PROMPTS[1:], num_inference_steps=3, seed=[12], output_type="np").images
    assert np.abs(a[1] - b[0]).max() < 1e-5
    c = fg(PROMPTS[1:], num_inference_steps=3, seed=[13], output_type="np").images
    assert np.abs(b - c).max() > 1e-3


def test_nfe_counts(digits_like, sd):
    assert digits_like([1], num_inference_steps=9, guidance_scale=1.0, seed=0).nfe == 9
    assert digits_like([1], num_inference_steps=9, guidance_scale=3.0, seed=0).nfe == 18
    fg = FastGenStableDiffusionPipeline.from_pipe(sd, scheduler=PNDMScheduler.from_config(sd.scheduler.config))
    calls = []
    hook = fg.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = fg("a cat", num_inference_steps=5, guidance_scale=3.0, seed=0)
    finally:
        hook.remove()
    # PNDM runs extra Runge-Kutta evaluations; every batched forward holds 2 evaluations per sample.
    assert out.nfe == 2 * len(calls) and len(calls) > 5


@pytest.mark.parametrize("solver", ["ddim", "dpmsolver++", "unipc", "euler", UniPCMultistepScheduler()])
def test_solver_choice_runs_and_matches_scheduler_swap(digits_like, solver):
    out = digits_like([2, 5], num_inference_steps=6, seed=0, solver=solver, output_type="pt")
    swapped = FastGenClassPipeline.from_pipe(digits_like)
    from fastgen.solvers import resolve_solver
    swapped.scheduler = resolve_solver(solver, digits_like.scheduler)
    ref = swapped([2, 5], num_inference_steps=6, seed=0, output_type="pt")
    assert torch.allclose(out.images, ref.images, atol=1e-6)
    assert digits_like.scheduler.__class__ is DPMSolverMultistepScheduler  # the pipeline's own is untouched


def test_callback_on_step_end_sees_and_replaces_latents(digits_like):
    seen = []

    def cb(pipe, i, t, kw):
        seen.append((i, kw["latents"].shape, kw["denoised"].shape))
        return {"latents": torch.zeros_like(kw["latents"])} if i == 5 else {}

    out = digits_like([1], num_inference_steps=6, seed=0, output_type="pt", callback_on_step_end=cb,
                      callback_on_step_end_tensor_inputs=["latents", "denoised"])
    assert [s[0] for s in seen] == list(range(6))
    assert torch.allclose(out.images, torch.full_like(out.images, 0.5))  # zero latents decode to mid-grey


def test_teleport_hook_skips_steps_and_gets_schedule_values(digits_like):
    calls = {}

    def jump(x, *, alpha_from, sigma_from, alpha_to, sigma_to):
        calls.update(alpha_from=alpha_from, sigma_from=sigma_from, alpha_to=alpha_to, sigma_to=sigma_to)
        return x * 0.5

    out = digits_like([4], num_inference_steps=10, seed=0, guidance_scale=2.0, teleport=jump, teleport_fraction=0.3)
    assert out.nfe == 2 * 7
    assert calls["alpha_to"] > calls["alpha_from"] and calls["sigma_to"] < calls["sigma_from"]
    assert abs(calls["alpha_from"] ** 2 + calls["sigma_from"] ** 2 - 1) < 1e-9


# ---------------------------------------------------------------- save / reload routes
def _assert_same_outputs(a, b, **kw):
    x = a(**kw).images
    y = b(**kw).images
    assert np.abs(np.asarray(x) - np.asarray(y)).max() == 0


def test_class_pipeline_save_reload_all_routes(digits_like, tmp_path):
    kw = dict(class_labels=[1, 2], num_inference_steps=3, seed=0, output_type="np")
    digits_like.save_pretrained(tmp_path / "a")
    index = json.loads((tmp_path / "a" / "model_index.json").read_text())
    assert index["_class_name"] == ["fastgen_class_pipeline", "FastGenClassPipeline"]
    own = FastGenClassPipeline.from_pretrained(tmp_path / "a")  # no trust_remote_code needed
    generic = DiffusionPipeline.from_pretrained(tmp_path / "a", trust_remote_code=True)
    assert type(own) is FastGenClassPipeline and type(generic) is FastGenClassPipeline
    assert own.labels == digits_like.labels
    _assert_same_outputs(digits_like, own, **kw)
    _assert_same_outputs(digits_like, generic, **kw)
    generic.save_pretrained(tmp_path / "b")  # re-save keeps both routes
    assert type(DiffusionPipeline.from_pretrained(tmp_path / "b", trust_remote_code=True)) is FastGenClassPipeline
    again = FastGenClassPipeline.from_pretrained(tmp_path / "b")
    _assert_same_outputs(digits_like, again, **kw)
    shared = FastGenClassPipeline.from_pipe(again)
    assert shared.unet is again.unet


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_text_pipelines_load_standard_folder_all_routes(kind, sd, sdxl, tmp_path):
    stock = sd if kind == "sd" else sdxl
    cls = FastGenStableDiffusionPipeline if kind == "sd" else FastGenStableDiffusionXLPipeline
    entry = REPO / "pipelines" / ("fastgen_sd_pipeline.py" if kind == "sd" else "fastgen_sdxl_pipeline.py")
    kw = dict(prompt="a cat", num_inference_steps=2, seed=0, output_type="np", height=16, width=16)
    stock.save_pretrained(tmp_path / "std")
    direct = cls.from_pretrained(tmp_path / "std")
    via_entry = DiffusionPipeline.from_pretrained(tmp_path / "std", custom_pipeline=str(entry), trust_remote_code=True)
    assert type(direct) is cls and type(via_entry) is cls
    _assert_same_outputs(direct, via_entry, **kw)
    direct.save_pretrained(tmp_path / "fg")
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(tmp_path / "fg")
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "fg", trust_remote_code=True)
    own = cls.from_pretrained(tmp_path / "fg")
    assert type(reloaded) is cls and type(own) is cls
    _assert_same_outputs(direct, own, **kw)
    own.save_pretrained(tmp_path / "fg2")
    assert type(cls.from_pretrained(tmp_path / "fg2")) is cls
    assert type(DiffusionPipeline.from_pretrained(tmp_path / "fg2", trust_remote_code=True)) is cls
