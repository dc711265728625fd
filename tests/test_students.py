"""Students: one/few-step chains, backward simulation, the student pipeline and the stock diffusers route."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, DiffusionPipeline, LCMScheduler, StableDiffusionPipeline, TCDScheduler
from diffusers.utils.torch_utils import randn_tensor

from fastgen.denoiser import Denoiser
from fastgen.pipelines.student import FastGenStudentPipeline, student_scheduler
from fastgen.training.students import Student, check_student_timesteps, split_conditions

from tiny import tiny_class_unet, tiny_sd


def _student(timesteps, renoise="fresh", step_draw="batch", grad_space="x0"):
    unet = tiny_class_unet()
    den = Denoiser.from_scheduler(unet, DDPMScheduler())
    return Student(unet, den.schedule, "epsilon", timesteps, renoise=renoise, step_draw=step_draw,
                   grad_space=grad_space), den


def test_one_step_student_is_the_teacher_x0_at_t_star():
    student, den = _student([700])
    z, cond = torch.randn(3, 1, 8, 8), {"class_labels": torch.tensor([0, 4, 9])}
    eps = den(z, torch.full((3,), 700), cond)
    a, s = den.alpha_sigma(700, like=z)
    expected = (z - s * eps) / a
    assert torch.allclose(student(z, cond), expected, atol=1e-5)
    assert torch.allclose(student.sample(z, cond), expected, atol=1e-5)


def _chain_by_hand(den, z, cond, timesteps, next_noise):
    """A few-step chain written out: x0 = (x - sigma eps) / alpha at each timestep, the next input
    alpha' x0 + sigma' next_noise(x, eps); returns the last x0."""
    x = z
    for i, t in enumerate(timesteps):
        eps = den(x, torch.full((x.shape[0],), t), cond)
        a, s = den.alpha_sigma(t, like=x)
        x0 = (x - s * eps) / a
        if i + 1 < len(timesteps):
            a2, s2 = den.alpha_sigma(timesteps[i + 1], like=x)
            x = a2 * x0 + s2 * next_noise(x, eps)
    return x0


def test_few_step_backward_simulation_runs_the_students_own_chain():
    student, den = _student([999, 600, 300])
    z, cond = torch.randn(2, 1, 8, 8), {"class_labels": torch.tensor([1, 2])}
    # step 2 by hand: x0 at 999, re-noise to 600, x0, re-noise to 300, x0 (with gradient)
    g = torch.Generator().manual_seed(5)
    x0 = _chain_by_hand(den, z, cond, [999, 600, 300], lambda x, eps: torch.randn(x.shape, generator=g))
    out = student(z, cond, torch.Generator().manual_seed(5), step=2)
    assert torch.allclose(out, x0, atol=1e-4)
    assert out.requires_grad
    # the full sample is the same chain; a random step comes from the generator only
    assert torch.allclose(student.sample(z, cond, torch.Generator().manual_seed(5)), x0.detach(), atol=1e-4)
    a = student(z, cond, torch.Generator().manual_seed(3))
    b = student(z, cond, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    # gradients reach the network only through the last step
    student.network.zero_grad()
    student(z, cond, torch.Generator().manual_seed(5), step=0).sum().backward()
    assert student.network.conv_in.weight.grad is not None


def test_ddim_renoise_chain_reuses_each_steps_noise_estimate():
    """renoise="ddim": the next input is alpha' x0 + sigma' eps_hat with eps_hat the network's own noise
    prediction (DDIM, eta = 0), so the chain is a function of the initial noise alone, and the training
    forward at the last step is the sample."""
    student, den = _student([999, 600, 300], renoise="ddim")
    z, cond = torch.randn(2, 1, 8, 8), {"class_labels": torch.tensor([1, 2])}
    x0 = _chain_by_hand(den, z, cond, [999, 600, 300], lambda x, eps: eps)
    out = student(z, cond, torch.Generator().manual_seed(5), step=2)
    assert torch.allclose(out, x0, atol=1e-4) and out.requires_grad
    for seed in (0, 1):  # no noise is drawn after the first input
        assert torch.allclose(student.sample(z, cond, torch.Generator().manual_seed(seed)), x0.detach(), atol=1e-4)
    fresh, _ = _student([999, 600, 300])
    fresh.load_state_dict(student.state_dict())
    assert (fresh.sample(z, cond, torch.Generator().manual_seed(5)) - x0).abs().max() > 1e-2
    with pytest.raises(ValueError, match=r"renoise must be one of \('fresh', 'ddim'\)"):
        _student([700], renoise="ode")


def test_per_sample_step_draw_gives_each_row_its_own_steps_chain():
    """step_draw="sample": row i is trained at its own random step, on the input the chain gives that step
    (the same as a batch forward at that step), and the default draw is one step for the whole batch."""
    timesteps = [999, 600, 300, 100]
    student, den = _student(timesteps, renoise="ddim", step_draw="sample")
    z, cond = torch.randn(6, 1, 8, 8), {"class_labels": torch.tensor([1, 2, 3, 4, 5, 6])}
    steps = torch.randint(4, (6,), generator=torch.Generator().manual_seed(11))
    assert len(set(steps.tolist())) > 2  # the seed mixes steps
    out = student(z, cond, torch.Generator().manual_seed(11))
    assert out.requires_grad
    for i, k in enumerate(steps.tolist()):
        one = {"class_labels": cond["class_labels"][i:i + 1]}
        expected = _chain_by_hand(den, z[i:i + 1], one, timesteps[:k + 1], lambda x, eps: eps)
        assert torch.allclose(out[i:i + 1], expected, atol=1e-4), (i, k)
    batch, _ = _student(timesteps, renoise="ddim")
    batch.load_state_dict(student.state_dict())
    k = int(torch.randint(4, (1,), generator=torch.Generator().manual_seed(11)))
    assert torch.allclose(batch(z, cond, torch.Generator().manual_seed(11)),
                          batch(z, cond, step=k), atol=1e-6)
    with pytest.raises(ValueError, match=r"step_draw must be one of \('batch', 'sample'\)"):
        _student([700], step_draw="row")


def _param_grad(student, z, cond, step, weight):
    student.network.zero_grad()
    out = student(z, cond, torch.Generator().manual_seed(2), step=step)
    (out * weight).sum().backward()
    return out.detach(), torch.cat([p.grad.reshape(-1) for p in student.network.parameters()])


def test_output_grad_space_scales_each_steps_gradient_by_the_x0_gain_ratio():
    """grad_space="output": the same forward, and the network gradient of step k is the x0-space one times
    (sigma/alpha at the first step) / (sigma/alpha at step k) for epsilon prediction (1 at step 0)."""
    timesteps = [500, 100, 20]
    x0_space, den = _student(timesteps, renoise="ddim")
    out_space, _ = _student(timesteps, renoise="ddim", grad_space="output")
    out_space.load_state_dict(x0_space.state_dict())
    z, cond = torch.randn(3, 1, 8, 8), {"class_labels": torch.tensor([1, 5, 8])}
    weight = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    a0, s0 = den.alpha_sigma(500, like=z)
    for k, t in enumerate(timesteps):
        ref_out, ref = _param_grad(x0_space, z, cond, k, weight)
        out, grad = _param_grad(out_space, z, cond, k, weight)
        assert torch.equal(out, ref_out)
        a, s = den.alpha_sigma(t, like=z)
        scale = float((s0 / a0) / (s / a))
        assert scale == pytest.approx(1.0) if k == 0 else scale > 3.0
        assert torch.allclose(grad, scale * ref, rtol=1e-4, atol=1e-6 * scale), (k, t)
    # per-row steps: each row's gradient is scaled by its own step's factor
    steps = torch.tensor([0, 2, 1])
    for i in range(3):
        row = torch.zeros_like(weight)
        row[i] = weight[i]
        _, ref = _param_grad(x0_space, z, cond, steps, row)
        _, grad = _param_grad(out_space, z, cond, steps, row)
        scale = float(out_space.output_grad_scale(int(steps[i]), like=z))
        assert torch.allclose(grad, scale * ref, rtol=1e-4, atol=1e-6 * scale), i
    with pytest.raises(ValueError, match=r"grad_space must be one of \('x0', 'output'\)"):
        _student([700], grad_space="eps")


@pytest.mark.parametrize("name, gain", [("epsilon", 0.6 / 0.8), ("v_prediction", 0.6), ("sample", 1.0),
                                        ("flow", 0.6)])
def test_x0_gain_is_the_data_predictions_slope_in_the_network_output(name, gain):
    from fastgen.parameterization import Parameterization

    p = Parameterization(name)
    assert p.x0_gain(0.8, 0.6) == pytest.approx(gain)
    x, out = torch.randn(4), torch.randn(4)  # to_x0 is affine in the output with that slope
    assert torch.allclose((p.to_x0(out + 0.5, x, 0.8, 0.6) - p.to_x0(out, x, 0.8, 0.6)).abs(),
                          torch.full((4,), 0.5 * gain))


def test_student_timestep_and_label_errors():
    with pytest.raises(ValueError, match="strictly decreasing"):
        check_student_timesteps([300, 600])
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        check_student_timesteps([1000])
    with pytest.raises(ValueError, match="non-empty"):
        check_student_timesteps([])
    with pytest.raises(TypeError, match="labels"):
        split_conditions("a cat")
    cond, uncond = split_conditions(torch.tensor([1, 2]), 10)
    assert torch.equal(uncond["class_labels"], torch.tensor([10, 10]))


def _student_pipe(timesteps, renoise="fresh"):
    unet = tiny_class_unet()
    teacher = type("T", (), {"unet": unet, "scheduler": DDPMScheduler(), "vae": None, "config": {"id2label": None}})()
    return FastGenStudentPipeline.from_teacher(teacher, unet, timesteps, renoise)


@pytest.mark.parametrize("timesteps", [[700], [999, 499]])
def test_student_pipeline_save_reload_both_routes_and_nfe(timesteps, tmp_path):
    pipe = _student_pipe(timesteps)
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.nfe == len(timesteps)
    out = pipe(class_labels=[0, 3, 7], seed=11, output_type="pt")
    assert out.nfe == len(timesteps) and out.images.shape == (3, 1, 8, 8)
    # own step list by default: equal to the student module's chain on the same noise and generators
    net = pipe.unet
    den = Denoiser.from_scheduler(net, pipe.scheduler)
    gens = [torch.Generator().manual_seed(11 + i) for i in range(3)]
    z = randn_tensor((3, 1, 8, 8), generator=gens)
    x0 = Student(net, den.schedule, "epsilon", timesteps).sample(z, {"class_labels": torch.tensor([0, 3, 7])}, gens)
    assert torch.allclose(out.images, (x0 / 2 + 0.5).clamp(0, 1), atol=1e-6)
    pipe.save_pretrained(tmp_path / "student")
    from fastgen.builtin import load_pipeline

    # the third route is fastgen sample --model FOLDER's (its folder check once took a 2-step student's
    # "student_timesteps": [999, 499] for a ["library", "Class"] component and refused the folder)
    for loader in (lambda p: FastGenStudentPipeline.from_pretrained(p),
                   lambda p: DiffusionPipeline.from_pretrained(p, trust_remote_code=True),
                   lambda p: load_pipeline(str(p))):
        again = loader(tmp_path / "student")
        assert type(again) is FastGenStudentPipeline
        assert again.student_timesteps == timesteps and again.nfe == len(timesteps)
        assert torch.equal(again(class_labels=[0, 3, 7], seed=11, output_type="pt").images, out.images)


def test_student_pipeline_call_errors():
    pipe = _student_pipe([700])
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe(class_labels=[1], guidance_scale=2.0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(class_labels=[1], num_inference_steps=4)
    with pytest.raises(TypeError, match="unsupported"):
        pipe(class_labels=[1], solver="ddim")


@pytest.mark.parametrize("timesteps", [[700], [999, 749, 499, 249]])
def test_stock_lcm_scheduler_route_matches_the_student_pipeline(timesteps):
    """The documented diffusers-only loop (UNet + LCMScheduler with the student's timesteps) gives the
    student pipeline's images."""
    pipe = _student_pipe(timesteps)
    labels = torch.tensor([2, 5])
    ours = pipe(class_labels=labels, generator=torch.Generator().manual_seed(0), output_type="pt").images
    scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(timesteps=pipe.config.student_timesteps)
    generator = torch.Generator().manual_seed(0)
    x = randn_tensor((2, 1, 8, 8), generator=generator)
    for t in scheduler.timesteps:
        eps = pipe.unet(x, t, class_labels=labels).sample
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
    assert torch.allclose((x / 2 + 0.5).clamp(0, 1), ours, atol=2e-5)


def test_stock_stable_diffusion_pipeline_route_runs_an_sd_student(tmp_path):
    """An SD student (the teacher's UNet architecture) runs in StableDiffusionPipeline with LCMScheduler,
    ``timesteps=student_timesteps`` and no CFG: the same latents as the Student module's chain."""
    pipe = tiny_sd(tmp_path)
    pipe = StableDiffusionPipeline(**{**pipe.components, "scheduler": student_scheduler(pipe.scheduler)})
    pipe.set_progress_bar_config(disable=True)
    den = Denoiser.from_scheduler(pipe.unet, pipe.scheduler)
    timesteps = [999, 499]
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    stock = pipe("a red cat", timesteps=timesteps, guidance_scale=1.0, latents=z, output_type="latent",
                 generator=torch.Generator().manual_seed(1)).images
    embeds, _ = pipe.encode_prompt("a red cat", "cpu", 1, False)
    ours = Student(pipe.unet, den.schedule, den.prediction_type, timesteps).sample(
        z, {"encoder_hidden_states": embeds}, torch.Generator().manual_seed(1))
    assert torch.allclose(stock, ours, atol=1e-5)


def test_fastgen_sample_runs_a_saved_student_folder_and_refuses_solver_options(tmp_path):
    """``fastgen sample --model <student folder>``: the student's own steps, no guidance, NFE 1 per image;
    options a student cannot honour are one error naming the option."""
    from fastgen.generate import sample_grid

    pipe = _student_pipe([700])
    pipe.save_pretrained(tmp_path / "student")
    rec = sample_grid(model=str(tmp_path / "student"), classes=[0, 1, 2], count=2, output=str(tmp_path / "g.png"),
                      progress=False)
    assert (rec["nfe"], rec["steps"], rec["guidance"], rec["images"]) == (1, 1, "none", 6)
    assert rec["solver"] == "student t = [700]" and (tmp_path / "g.png").is_file()
    for bad, name in ((dict(steps=4), "steps"), (dict(guidance="cfg"), "guidance"), (dict(guidance_scale=3.0), "guidance"),
                      (dict(solver="ddim"), "solver")):
        with pytest.raises(ValueError, match=f"^{name}: "):
            sample_grid(model=str(tmp_path / "student"), classes=[0], count=1, output=str(tmp_path / "h.png"),
                        progress=False, **bad)
    assert not (tmp_path / "h.png").exists()


def test_eval_fid_scores_a_student_folder_with_its_own_steps(tmp_path):
    """``fastgen eval fid --fake <student folder>``: one network evaluation per image, no guidance; the same
    figures as ``evaluate_pipeline`` on the loaded student; solver options are refused by name."""
    import fastgen
    from fastgen.evaluation import fid
    from fastgen.metrics import evaluate_pipeline

    teacher = fastgen.load_builtin("digits")
    FastGenStudentPipeline.from_teacher(teacher, teacher.unet, [500]).save_pretrained(tmp_path / "s")
    rec = fid(fake=str(tmp_path / "s"), n=20, knn_metrics=False, progress=False)
    assert (rec["nfe"], rec["steps"], rec["guidance"], rec["guidance_scale"]) == (1, 1, "none", 1.0)
    ref = evaluate_pipeline(FastGenStudentPipeline.from_pretrained(tmp_path / "s"), 20, knn_metrics=False,
                            progress=False)
    assert rec["fid"] == pytest.approx(ref.fid, rel=1e-6)
    with pytest.raises(ValueError, match="^steps: "):
        fid(fake=str(tmp_path / "s"), n=20, steps=20, progress=False)


def test_builtin_one_step_student_reproduces_its_card():
    """``builtin:digits-1step``: one evaluation per image at t* = 500; figures pinned from the build run
    (the card's 2,000-sample FID is 0.96; 200 samples, same seeds, give 2.20)."""
    import fastgen
    from fastgen.metrics import evaluate_pipeline

    pipe = fastgen.load_builtin("digits-1step")
    assert type(pipe) is FastGenStudentPipeline and pipe.nfe == 1 and pipe.student_timesteps == [500]
    images = pipe(class_labels=[0, 1, 2, 3], seed=0, output_type="pt").images
    assert images.mean().item() == pytest.approx(0.324888, abs=1e-4)
    res = evaluate_pipeline(pipe, 200, progress=False)
    assert res.nfe == 1 and res.accuracy == pytest.approx(0.995)
    assert res.fid == pytest.approx(2.1950, abs=0.01) and res.roughness == pytest.approx(0.10322, abs=1e-4)


@pytest.mark.parametrize("timesteps", [[700], [500, 20], [999, 749, 499, 249]])
def test_stock_tcd_scheduler_route_matches_a_ddim_student(timesteps, tmp_path):
    """A renoise="ddim" student's folder holds a TCDScheduler; the documented loop (eta=0, x0 read from the
    last output) gives the pipeline's images; the mode survives save/reload and can be overridden per call."""
    pipe = _student_pipe(timesteps, "ddim")
    assert isinstance(pipe.scheduler, TCDScheduler) and pipe.student_renoise == "ddim"
    assert pipe.steps_label == (f"t = {timesteps}, ddim re-noise" if len(timesteps) > 1 else f"t = {timesteps}")
    labels = torch.tensor([2, 5])
    ours = pipe(class_labels=labels, generator=torch.Generator().manual_seed(0), output_type="pt").images
    scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(timesteps=pipe.config.student_timesteps)
    x = randn_tensor((2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(scheduler.timesteps):
        eps = pipe.unet(x, t, class_labels=labels).sample
        if i + 1 < len(scheduler.timesteps):
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    a = scheduler.alphas_cumprod[t]
    assert torch.allclose((((x - (1 - a).sqrt() * eps) / a.sqrt()) / 2 + 0.5).clamp(0, 1), ours, atol=2e-5)
    fresh = pipe(class_labels=labels, generator=torch.Generator().manual_seed(0), output_type="pt", renoise="fresh")
    assert torch.equal(fresh.images, ours) == (len(timesteps) == 1)
    with pytest.raises(ValueError, match="renoise must be one of"):
        pipe(class_labels=labels, renoise="sde")
    pipe.save_pretrained(tmp_path / "s")
    again = FastGenStudentPipeline.from_pretrained(tmp_path / "s")
    assert again.student_renoise == "ddim" and isinstance(again.scheduler, TCDScheduler)
    assert torch.equal(again(class_labels=labels, generator=torch.Generator().manual_seed(0), output_type="pt").images,
                       ours)


def test_student_folders_saved_before_renoise_existed_are_fresh(tmp_path):
    import json

    pipe = _student_pipe([500, 20])
    pipe.save_pretrained(tmp_path / "s")
    index = json.loads((tmp_path / "s" / "model_index.json").read_text())
    assert index.pop("student_renoise") == "fresh"
    (tmp_path / "s" / "model_index.json").write_text(json.dumps(index))
    again = FastGenStudentPipeline.from_pretrained(tmp_path / "s")
    assert again.student_renoise == "fresh"
    out = again(class_labels=[1, 2], seed=3, output_type="pt").images
    assert torch.equal(out, pipe(class_labels=[1, 2], seed=3, output_type="pt").images)
