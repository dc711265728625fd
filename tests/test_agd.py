"""AGD (adapter guidance distillation, arXiv:2503.07274; spec distillation.md §5, §0.12): guidance adapters,
the trajectory store, the training method, and the one-evaluation-per-step pipeline path.

Mutations each test was seen to catch are listed in the closing report of issue 13 (and in the test docstrings).
"""
from __future__ import annotations

import copy
import json
import types

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

import fastgen
from fastgen.adapters import GuidanceAdapter, adapter_targets, load_guidance_adapter
from fastgen.pipelines.class_conditional import FastGenClassPipeline
from fastgen.training.agd import AGD, TrajectoryStore, cfg_output, collect_trajectories, trajectory_inputs
from fastgen.training.config import DistillConfig
from fastgen.training.teacher import load_teacher
from tiny import tiny_class_unet, tiny_dit, tiny_sd, tiny_sdxl

T = torch.tensor([10, 500, 900])
# MSE to the stored CFG targets of the tiny store before / after 10 AdamW steps (lr 1e-2, cosine), known-good run
PINNED_MSE = (0.117902, 0.113918)


# ---------------------------------------------------------------------- helpers
def _forward(model, kind):
    """A fixed base call for each architecture (batch 3)."""
    g = torch.Generator().manual_seed(0)
    if kind == "class":
        s = model.config.sample_size
        x = torch.randn(3, model.config.in_channels, s, s, generator=g)
        return lambda: model(x, T, class_labels=torch.tensor([0, 1, 2])).sample
    x = torch.randn(3, 4, 8, 8, generator=g)
    if kind == "dit":
        return lambda: model(hidden_states=x, timestep=T, class_labels=torch.tensor([0, 1, 2])).sample
    ehs = torch.randn(3, 7, model.config.cross_attention_dim, generator=g)
    if kind == "sd":
        return lambda: model(x, T, encoder_hidden_states=ehs).sample
    add = {"text_embeds": torch.randn(3, 16, generator=g), "time_ids": torch.randn(3, 6, generator=g)}
    return lambda: model(x, T, encoder_hidden_states=ehs, added_cond_kwargs=add).sample


@pytest.fixture(scope="module")
def digits_unet():
    return fastgen.load_builtin("digits").unet


@pytest.fixture(scope="module")
def bases(tmp_path_factory, digits_unet):
    tmp = tmp_path_factory.mktemp("tok")
    return {"sd": tiny_sd(tmp).unet, "sdxl": tiny_sdxl(tmp).unet, "dit": tiny_dit(), "class": tiny_class_unet(),
            "digits": digits_unet}


def _kind(name):
    return "class" if name in ("class", "digits") else name


def _class_pipe(num_classes=3):
    pipe = FastGenClassPipeline(scheduler=DDIMScheduler(clip_sample=False), unet=tiny_class_unet(num_classes=num_classes))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------- adapters
@pytest.mark.parametrize("variant", ["additive", "attention"])
@pytest.mark.parametrize("name", ["sd", "sdxl", "dit", "digits"])
def test_zero_init_adapter_equals_base_bit_for_bit(bases, name, variant):
    """A fresh (zero-init) adapter leaves the base output unchanged exactly, at any omega; a non-zero adapter
    changes it, and disabling or detaching it restores the base exactly. (Caught: dropping the zeroing of
    the output projection; returning the adapter's output instead of the residual.)"""
    model = bases[name]
    run = _forward(model, _kind(name))
    with torch.no_grad():
        ref = run()
        adapter = GuidanceAdapter.for_model(model, variant=variant).attach(model)
        try:
            adapter.set_guidance_scale(torch.tensor([1.0, 3.0, 7.5]))
            assert torch.equal(run(), ref)
        finally:
            adapter.detach()
        live = GuidanceAdapter.for_model(model, variant=variant, zero_init=False).attach(model)
        try:
            live.set_guidance_scale(4.0)
            assert (run() - ref).abs().max() > 1e-4
            live.enabled = False
            assert torch.equal(run(), ref)
        finally:
            live.detach()
        assert torch.equal(run(), ref)


def test_adapters_cover_every_cross_attention_including_the_extra_up_block_one(bases):
    """All attn2 of a text UNet (up blocks have layers_per_block + 1 attentions, spec §0.12), every DiT attn1,
    every self-attention of the class UNet. (Caught: skipping the last attention of each up block.)"""
    sd = bases["sd"]
    attn2 = {n for n, _ in sd.named_modules() if n.endswith("attn2")}
    assert set(adapter_targets(sd)) == attn2 and len(attn2) == 4
    up = [n for n in attn2 if n.startswith("up_blocks.0.")]
    assert len(up) == sd.config.layers_per_block + 1
    assert set(adapter_targets(bases["dit"])) == {"transformer_blocks.0.attn1", "transformer_blocks.1.attn1"}
    assert set(adapter_targets(bases["digits"])) == {"down_blocks.1.attentions.0", "up_blocks.1.attentions.0",
                                                     "up_blocks.1.attentions.1", "mid_block.attentions.0"}


def test_trainable_shares_and_default_variants(bases):
    """Paper: ~2% extra parameters. Tiny UNet2DConditionModel < 5% (attention variant, the SD default), digits < 3%."""
    shares = {}
    for name, model in bases.items():
        adapter = GuidanceAdapter.for_model(model)
        shares[name] = adapter.trainable_share(model)
        assert adapter.config.variant == ("attention" if name in ("sd", "sdxl") else "additive")
    assert shares["sd"] < 0.05 and shares["sdxl"] < 0.05
    assert shares["digits"] < 0.03
    assert shares["dit"] < 0.05 and shares["class"] < 0.05
    assert GuidanceAdapter.for_model(bases["digits"]).num_parameters_trainable() == 23832  # pinned: 1.37% of 1,744,513


def test_omega_conditions_the_adapter_and_timestep_comes_from_the_base_embedding(bases):
    """Different omegas give different outputs; the adapter reads the base's own time (+class) embedding."""
    model = bases["digits"]
    run = _forward(model, "class")
    adapter = GuidanceAdapter.for_model(model, zero_init=False).attach(model)
    try:
        with torch.no_grad(), adapter.guidance_scale(2.0):
            a = run()
            emb = adapter._embedding()
        with torch.no_grad(), adapter.guidance_scale(6.0):
            b = run()
        assert (a - b).abs().max() > 1e-5
        with torch.no_grad():
            t_emb = model.time_embedding(model.time_proj(T).to(model.dtype))
            expect = t_emb + model.class_embedding(torch.tensor([0, 1, 2]))
        assert torch.equal(emb, expect)
    finally:
        adapter.detach()


def test_save_load_round_trip_keeps_fourier_buffers(bases, tmp_path):
    """config.json + safetensors; the random Fourier frequencies travel with the weights. (Caught: registering
    the frequencies as non-persistent buffers.)"""
    model = bases["sd"]
    adapter = GuidanceAdapter.for_model(model, zero_init=False, seed=3)
    with torch.no_grad():
        adapter.omega_embedding.frequencies.mul_(2.0)  # not what the config's seed would regenerate
    adapter.save_pretrained(tmp_path / "ad")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = load_guidance_adapter(tmp_path / "ad" / "diffusion_pytorch_model.safetensors")
    a, b = adapter.state_dict(), loaded.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    run = _forward(model, "sd")
    with torch.no_grad():
        outs = []
        for ad in (adapter, loaded):
            ad.attach(model)
            with ad.guidance_scale(5.0):
                outs.append(run())
            ad.detach()
    assert torch.equal(outs[0], outs[1])


def test_adapter_refuses_another_base_and_bad_options(bases):
    adapter = GuidanceAdapter.for_model(bases["sd"])
    with pytest.raises(ValueError, match="built for"):
        adapter.attach(bases["digits"])
    with pytest.raises(ValueError, match="variant"):
        GuidanceAdapter.for_model(bases["sd"], variant="gate")
    with pytest.raises(ValueError, match="guidance_scale"):
        adapter.set_guidance_scale(float("nan"))
    with pytest.raises(FileNotFoundError, match="path_or_folder"):
        load_guidance_adapter("/nonexistent/adapter")


# ---------------------------------------------------------------------- pipelines
def test_pipeline_with_adapter_runs_one_evaluation_per_step(tmp_path):
    """With an adapter loaded, pipe(guidance_scale=w) is one pass per step (.nfe = steps); a zero-init adapter
    gives exactly the unguided images; unloading restores CFG. (Caught: keeping the CFG guider in _denoise.)"""
    pipe = _class_pipe()
    kw = dict(class_labels=[0, 1, 2], num_inference_steps=4, seed=0, output_type="pt")
    cfg = pipe(guidance_scale=3.0, **kw)
    plain = pipe(guidance_scale=1.0, **kw)
    GuidanceAdapter.for_model(pipe.unet).save_pretrained(tmp_path / "ad")
    pipe.load_guidance_adapter(tmp_path / "ad")
    out = pipe(guidance_scale=3.0, **kw)
    assert cfg.nfe == 8 and out.nfe == 4
    assert torch.equal(out.images, plain.images)
    with pytest.raises(ValueError, match="unload_guidance_adapter"):
        pipe(guidance="apg", guidance_scale=3.0, **kw)
    pipe.unload_guidance_adapter()
    again = pipe(guidance_scale=3.0, **kw)
    assert again.nfe == 8 and torch.equal(again.images, cfg.images)


def test_cfg_window_switches_the_adapter_off_late_and_scale_one_is_the_base(tmp_path):
    """Late drop: guidance=CFG(w, stop=0.5) with an adapter runs the adapter at w for the first half of the steps
    and the bare base (CFG at 1) for the rest, one evaluation per step; guidance_scale=1 is the base exactly even
    with a trained (non-zero) adapter; the adapter's state is restored after each call. (Caught: inverting the
    window test in AdapterGuidance; leaving the adapter on at scale 1.)"""
    from fastgen.guidance import CFG

    pipe = _class_pipe()
    kw = dict(class_labels=[0, 1, 2], num_inference_steps=4, seed=0, output_type="pt")
    plain = pipe(guidance_scale=1.0, **kw)
    adapter = pipe.load_guidance_adapter(GuidanceAdapter.for_model(pipe.unet, zero_init=False))
    seen = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda m, a: seen.append((adapter.enabled, float(adapter._omega) if adapter.enabled else None)))
    late = pipe(guidance=CFG(guidance_scale=4.0, stop=0.5), guidance_scale=4.0, **kw)
    assert late.nfe == 4 and seen == [(True, 4.0), (True, 4.0), (False, None), (False, None)]
    seen.clear()
    assert torch.equal(pipe(guidance_scale=1.0, **kw).images, plain.images) and seen == [(False, None)] * 4
    handle.remove()
    assert adapter.enabled and adapter._omega == 1.0  # restored after the call
    full = pipe(guidance_scale=4.0, **kw)
    assert full.nfe == 4 and not torch.equal(full.images, late.images)
    with pytest.raises(ValueError, match="guidance_rescale"):
        pipe(guidance=CFG(guidance_scale=4.0, guidance_rescale=0.7), guidance_scale=4.0, **kw)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_text_pipelines_with_adapter_report_steps(tmp_path, family):
    from fastgen import FastGenStableDiffusionPipeline, FastGenStableDiffusionXLPipeline

    if family == "sd":
        pipe = FastGenStableDiffusionPipeline.from_pipe(tiny_sd(tmp_path))
    else:
        pipe = FastGenStableDiffusionXLPipeline.from_pipe(tiny_sdxl(tmp_path))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a red cat", num_inference_steps=3, output_type="latent", seed=0)
    plain = pipe(guidance_scale=1.0, **kw)
    pipe.load_guidance_adapter(GuidanceAdapter.for_model(pipe.unet))
    out = pipe(guidance_scale=5.0, **kw)
    assert out.nfe == 3 and torch.equal(out.images, plain.images)


# ---------------------------------------------------------------------- trajectories
class _Shard(types.SimpleNamespace):
    """A stand-in for accelerate's PartialState: one shard of a multi-process run, in this process."""

    is_main_process = property(lambda self: self.process_index == 0)

    def wait_for_everyone(self):
        pass


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("traj") / "store"
    collect_trajectories("tiny", folder, num_trajectories=6, num_inference_steps=4, omega_range=(1.0, 6.0),
                         batch_size=4, progress=False, pipeline=_class_pipe())
    return folder


def test_store_holds_the_cfg_combined_raw_output_at_each_stored_input(store_dir):
    """Each row's target is CFG at the trajectory's omega (checked against fastgen's CFG guider) of the stored
    x_t at the stored t; omega is one draw per trajectory; the first input is the trajectory's noise.
    (Caught: storing the conditional output; a sign flip in the CFG combination; storing t of the next step.)"""
    from fastgen.denoiser import Denoiser, GuidedDenoiser
    from fastgen.guidance import CFG

    store = TrajectoryStore(store_dir)
    pipe = _class_pipe()
    den = Denoiser.from_scheduler(pipe.unet, pipe.scheduler)
    assert store.complete and store.num_steps == 4 and store.sample_shape == (1, 8, 8)
    for i in (0, 5):
        noise, omega = trajectory_inputs(i, 0, (1, 8, 8), (1.0, 6.0))
        assert float(store.arrays["omega"][i]) == pytest.approx(omega, abs=1e-6) and 1.0 <= omega <= 6.0
        assert torch.equal(torch.from_numpy(np.array(store.arrays["x_t"][i, 0])), noise.half())
        label = int(store.arrays["cond.class_labels"][i])
        assert label == i % 3
        guided = GuidedDenoiser(den, CFG(guidance_scale=omega), {"class_labels": torch.tensor([label])},
                                {"class_labels": torch.tensor([3])})
        for s in range(4):
            x = torch.from_numpy(np.array(store.arrays["x_t"][i, s])).float()[None]
            t = float(store.arrays["t"][i, s])
            with torch.no_grad():
                expect = guided(x, torch.tensor(t).long()).model_output
            got = torch.from_numpy(np.array(store.arrays["target"][i, s])).float()[None]
            assert (got - expect).abs().max() < 5e-3 * max(1.0, expect.abs().max().item())
    assert [float(v) for v in store.arrays["t"][0]] == [float(v) for v in _timesteps(4)]


def _timesteps(n):
    s = DDIMScheduler(clip_sample=False)
    s.set_timesteps(n)
    return s.timesteps


def test_store_resumes_and_shards_to_identical_contents(store_dir, tmp_path):
    """An interrupted store finishes where it stopped; two shards fill the same store as one process, bit for
    bit. (Caught: drawing noise from a batch-level generator instead of per trajectory.)"""
    ref = TrajectoryStore(store_dir)
    folder = tmp_path / "s"
    kw = dict(num_trajectories=6, num_inference_steps=4, omega_range=(1.0, 6.0), progress=False)
    for rank in (0, 1):  # two shards (the main one creates the store)
        r = collect_trajectories("tiny", folder, batch_size=2, pipeline=_class_pipe(),
                                 state=_Shard(process_index=rank, num_processes=2, device=torch.device("cpu")), **kw)
        assert r["collected"] == 3
    store = TrajectoryStore(folder, mode="r+")
    store.arrays["done"][[1, 4]] = 0  # "killed" before these two were flagged
    store.arrays["x_t"][[1, 4]] = 0
    store.arrays["done"].flush()
    store.arrays["x_t"].flush()
    r = collect_trajectories("tiny", folder, batch_size=4, pipeline=_class_pipe(), **kw)
    assert r["collected"] == 2 and r["complete"]
    store = TrajectoryStore(folder)
    for name, arr in ref.arrays.items():  # noise, omega, labels, flags: exact; network outputs (fp16) may differ in
        a, b = np.asarray(arr), np.asarray(store.arrays[name])  # the last bit across batch sizes (conv kernels)
        if a.dtype.kind == "f" and name not in ("omega", "t"):
            assert np.allclose(a.astype(np.float32), b.astype(np.float32), rtol=2e-3, atol=2e-3), name
        else:
            assert np.array_equal(a, b), name
    with pytest.raises(ValueError, match="other settings"):
        collect_trajectories("tiny", folder, pipeline=_class_pipe(), **{**kw, "omega_range": (1.0, 9.0)})
    with pytest.raises(ValueError, match="omega_range"):
        collect_trajectories("tiny", tmp_path / "x", pipeline=_class_pipe(), **{**kw, "omega_range": (3.0, 1.0)})


# ---------------------------------------------------------------------- training
def _teacher(pipe, scale=3.0):
    return load_teacher(DistillConfig(guidance="cfg", guidance_scale=scale), pipeline=pipe)


def test_only_adapter_parameters_train_and_sample_runs_one_pass_per_step(store_dir):
    pipe = _class_pipe()
    method = AGD(_teacher(pipe), trajectories=str(store_dir))
    trainable = {id(p) for p in list(method.parameters()) + list(pipe.unet.parameters()) if p.requires_grad}
    adapter = {id(p) for p in method.adapter.parameters()}
    assert trainable == adapter and [id(p) for p in method.optimizer_groups()["generator"]] == [id(p) for p in
                                                                                                method.adapter.parameters()]
    assert sorted(n for n, _ in method.named_children()) == ["adapter"]  # the base is never saved with it
    calls = []
    handle = pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    x = method.sample(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))
    handle.remove()
    assert x.shape == (2, 1, 8, 8) and len(calls) == method.config.eval_steps


def _mse(method, store):
    rows = store.rows(np.arange(store.num_trajectories * store.num_steps))
    with torch.no_grad():
        pred = method._prediction(rows["x_t"].float(), rows["t"], rows["cond"], rows["omega"])
    return torch.nn.functional.mse_loss(pred.float(), rows["target"].float()).item()


def _train(method, pipe, out, steps, **extra):
    from fastgen.training.trainer import DistillTrainer

    cfg = DistillConfig(method="agd", output_dir=str(out), max_train_steps=steps, train_batch_size=8,
                        learning_rate=1e-2, use_ema=False, progress=False, report_to="none", logging_steps=1,
                        checkpointing_steps=2, lr_scheduler="cosine", lr_warmup_steps=1, adam_weight_decay=0.0,
                        mixed_precision="no", method_options={"trajectories": method.config.trajectories}, **extra)
    return DistillTrainer(cfg, method=method, teacher=_teacher(pipe)).train()


def test_short_training_lowers_the_mse_and_resumes_exactly(store_dir, tmp_path):
    """A few AdamW steps lower the MSE to the stored CFG targets (pinned from a known-good run); a run resumed
    from its checkpoint ends with the same adapter as an uninterrupted one; the exported adapter loads into the
    pipeline. (Caught: a sign flip of the target; training on the conditional output; omega not set on rows.)"""
    store = TrajectoryStore(store_dir)
    pipe = _class_pipe()
    method = AGD(_teacher(pipe), trajectories=str(store_dir))
    before = _mse(method, store)
    _train(method, pipe, tmp_path / "a", 10)
    after = _mse(method, store)
    assert after < 0.98 * before  # a random tiny base: the CFG correction is hard to fit, but it moves
    assert (before, after) == pytest.approx(PINNED_MSE, rel=2e-3)
    # resume: a run interrupted during step 5 (checkpoint-4 saved) continues to 10 from checkpoint-4
    pipe_b = _class_pipe()
    first = AGD(_teacher(pipe_b), trajectories=str(store_dir))
    loss, calls = first.generator_loss, []

    def interrupted(batch):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return loss(batch)
    first.generator_loss = interrupted
    with pytest.raises(KeyboardInterrupt):
        _train(first, pipe_b, tmp_path / "b", 10)
    first.adapter.detach()
    resumed = AGD(_teacher(pipe_b), trajectories=str(store_dir))
    _train(resumed, pipe_b, tmp_path / "b", 10, resume_from_checkpoint="latest")
    a, b = method.adapter.state_dict(), resumed.adapter.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    method.adapter.detach()
    resumed.adapter.detach()
    # the exported adapter: pipe.load_guidance_adapter(run folder)
    pipe.load_guidance_adapter(tmp_path / "a")
    out = pipe(class_labels=[0, 1], num_inference_steps=4, guidance_scale=4.0, seed=0, output_type="pt")
    assert out.nfe == 4 and torch.isfinite(out.images).all()


def test_forward_noised_baseline_and_method_options(store_dir):
    """The classic baseline trains on forward-noised real data with the base's CFG as target (adapter off)."""
    from fastgen.training.method import Batch

    pipe = _class_pipe()
    method = AGD(_teacher(pipe), source="forward_noised", omega_range=(2.0, 2.0))
    g = torch.Generator().manual_seed(0)
    real = torch.rand(4, 1, 8, 8) * 2 - 1
    batch = Batch(labels=None, noise=torch.zeros(4, 1, 8, 8), real=real, real_labels=torch.tensor([0, 1, 2, 0]),
                  generator=g)
    out = method.generator_loss(batch)
    assert out["loss"].requires_grad and out["loss"].item() > 0
    # with a zero-init adapter the loss is the CFG correction ||(w - 1)(c - u)||^2 at w = 2 -> ||c - u||^2
    rows = method._rows(Batch(labels=None, noise=torch.zeros(4, 1, 8, 8), real=real,
                              real_labels=torch.tensor([0, 1, 2, 0]), generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        c = method.denoiser(rows["x_t"], rows["t"], rows["cond"])
        u = method.denoiser(rows["x_t"], rows["t"], {"class_labels": torch.full((4,), 3)})
    assert out["loss"].item() == pytest.approx(torch.nn.functional.mse_loss(c, u).item(), rel=1e-5)
    with pytest.raises(ValueError, match="trajectories"):
        AGD(_teacher(_class_pipe()))
    with pytest.raises(TypeError, match="unknown agd options"):
        AGD(_teacher(_class_pipe()), trajectories=str(store_dir), bogus=1)
    with pytest.raises(ValueError, match="omega_range"):
        DistillConfig(method="agd", method_options={"trajectories": str(store_dir), "omega_range": [5, 1]}).validate()


def test_collect_trajectories_cli(tmp_path, capsys):
    from fastgen.cli import main

    pipe = _class_pipe()
    pipe.save_pretrained(tmp_path / "pipe")
    code = main(["distill", "collect-trajectories", "--teacher", str(tmp_path / "pipe"), "--output-dir",
                 str(tmp_path / "s"), "--num-trajectories", "2", "--num-inference-steps", "2", "--json",
                 "--progress", "false", "--threads", "1"])
    assert code == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["complete"] and record["collected"] == 2
    assert main(["distill", "--method", "agd", "--method-options", json.dumps({"trajectories": str(tmp_path / "s")}),
                 "--teacher", str(tmp_path / "pipe"), "--validate-only", "--json"]) == 0


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_text_trajectories_store_prompt_conditions_and_train(tmp_path, family):
    """Text bases: the store keeps each trajectory's prompt embeddings (SDXL: also text_embeds and time_ids,
    spec §5.2) and AGD trains on them (attention adapter reading the prompt tokens)."""
    from fastgen import FastGenStableDiffusionPipeline, FastGenStableDiffusionXLPipeline
    from fastgen.training.method import Batch

    if family == "sd":
        pipe = FastGenStableDiffusionPipeline.from_pipe(tiny_sd(tmp_path))
    else:
        pipe = FastGenStableDiffusionXLPipeline.from_pipe(tiny_sdxl(tmp_path))
    pipe.set_progress_bar_config(disable=True)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\n")
    collect_trajectories("tiny", tmp_path / "s", num_trajectories=2, num_inference_steps=2, prompts=str(prompts),
                         progress=False, pipeline=pipe, omega_range=(2.0, 4.0))
    store = TrajectoryStore(tmp_path / "s")
    expect = {"encoder_hidden_states"} | ({"added_cond_kwargs.text_embeds", "added_cond_kwargs.time_ids"}
                                          if family == "sdxl" else set())
    assert set(store.meta["condition"]) == expect and store.complete
    ehs = np.asarray(store.arrays["cond.encoder_hidden_states"])
    assert not np.array_equal(ehs[0], ehs[1])  # one prompt per trajectory
    teacher = load_teacher(DistillConfig(guidance="cfg", guidance_scale=3.0), pipeline=pipe)
    method = AGD(teacher, trajectories=str(tmp_path / "s"), zero_init=False)
    out = method.generator_loss(Batch(labels=None, noise=torch.zeros(3, 4, 8, 8), real=None,
                                      generator=torch.Generator().manual_seed(0)))
    out["loss"].backward()
    assert method.adapter.context_proj.weight.grad.abs().sum() > 0
    method.adapter.detach()


# ---------------------------------------------------------------------- the built-in adapter
# builtin:digits-agd at omega 5, 4 DPM-Solver++ steps, seed 0, digits 3 and 7: mean pixel and one pixel (known-good)
PINNED_BUILTIN = (0.341971, 0.729470, 0.682498)


def test_builtin_digits_agd_loads_and_reproduces_its_pinned_output():
    """`pipe.load_guidance_adapter("builtin:digits-agd")` on the digits model: one evaluation per step, under 3%
    extra parameters, output pinned from the build; the adapter moves the image from the unguided one towards
    CFG's. (Caught: feeding omega - 1 to the adapter in AdapterGuidance; subtracting the residual in the block hook.)"""
    pipe = fastgen.load_builtin("digits")
    pipe.set_progress_bar_config(disable=True)
    kw = dict(class_labels=[3, 7], num_inference_steps=4, seed=0, output_type="pt")
    with torch.no_grad():
        cfg = pipe(guidance_scale=5.0, **kw).images
        plain = pipe(guidance_scale=1.0, **kw).images
        adapter = pipe.load_guidance_adapter("builtin:digits-agd")
        out = pipe(guidance_scale=5.0, **kw)
    pipe.unload_guidance_adapter()
    assert out.nfe == 4 and adapter.trainable_share(pipe.unet) < 0.03
    img = out.images
    assert (img - cfg).pow(2).mean() < (plain - cfg).pow(2).mean()  # closer to CFG than the unguided image
    got = (img.mean().item(), img[0, 0, 8, 8].item(), img[1, 0, 4, 10].item())
    assert got == pytest.approx(PINNED_BUILTIN, abs=1e-4)
