"""Distillation methods: the f-divergence weights, DMD's gradient, f-distill == DMD2 for rkl, method steps.

Numerical checks follow spec distillation.md section 2.7: the f-gradient identity against finite
differences of the exact divergence (1-D), the oracle mode test (rkl collapses, kl covers), and the
invariants of h.
"""
from __future__ import annotations

import math
import threading

import pytest
import torch
from diffusers import DDPMScheduler

from fastgen.denoiser import Denoiser
from fastgen.training.divergences import (DIVERGENCES, H_AT_ONE, H_SCALE, FDivergenceWeight, RatioConfig,
                                          density_ratio, f_generator, h_weight)
from fastgen.training.dmd2 import DMD2, dmd_gradient, dmd_loss
from fastgen.training.f_distill import FDistill
from fastgen.training.method import Batch

from tiny import tiny_class_unet, tiny_dit, tiny_sd, tiny_sdxl

TABLE = ("rkl", "kl", "js", "sh", "jf", "sf")  # the divergences of the spec's gradient-identity test


# ---------------------------------------------------------------------- h(r)
def test_h_at_one_matches_the_spec_table():
    one = torch.ones(3)
    for div in DIVERGENCES:
        assert torch.allclose(h_weight(div, one), torch.full((3,), H_AT_ONE[div])), div


def test_h_is_f_second_derivative_times_r_squared():
    """h (form used) = H_SCALE * f''(r) r^2 for every divergence, by autograd on the generator f."""
    r = torch.tensor([0.1, 0.3, 0.9, 1.0, 2.5, 7.0, 20.0], dtype=torch.float64, requires_grad=True)
    for div in DIVERGENCES:
        (d1,) = torch.autograd.grad(f_generator(div, r).sum(), r, create_graph=True)
        (d2,) = torch.autograd.grad(d1.sum(), r)
        assert abs(float(f_generator(div, torch.ones((), dtype=torch.float64)))) < 1e-12, div  # f(1) = 0
        assert torch.allclose(h_weight(div, r.detach()), H_SCALE[div] * d2 * r.detach() ** 2, rtol=1e-9), div


def test_h_non_negative_and_batch_mean_one():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(256, generator=g) * 4
    t = torch.randint(20, 981, (256,), generator=g)
    for div in DIVERGENCES:
        for bins in (True, False):
            h = FDivergenceWeight(divergence=div, ratio_normalization=bins)(logits, t)
            assert h.shape == (256,) and h.dtype == torch.float32 and not h.requires_grad
            assert (h >= 0).all(), div
            assert abs(float(h.mean()) - 1.0) < 1e-5, (div, float(h.mean()))


def test_rkl_is_exactly_one_without_statistics():
    logits = torch.tensor([-30.0, -1.0, 0.0, 3.0, 50.0])
    w = FDivergenceWeight(divergence="rkl", ratio_ema_rate=0.5)
    h = w(logits, torch.tensor([20, 100, 500, 900, 980]))
    assert torch.equal(h, torch.ones(5))
    assert torch.equal(w.ema_mean, torch.ones(10)) and not w.ema_seen.any()  # no statistics taken


def test_density_ratio_clamps_detaches_and_clips():
    logits = torch.tensor([-100.0, -1.0, 0.0, 1.0, 100.0], requires_grad=True)
    r = density_ratio(logits)
    assert not r.requires_grad
    assert torch.allclose(r, torch.tensor([0.1, math.exp(-1), 1.0, math.e, 20.0]))


def test_ratio_is_normalised_per_time_bin():
    """js weights of two bins whose ratios differ by a constant factor are equal after bin normalisation."""
    t = torch.tensor([25, 30, 35, 970, 975, 978])
    logits = torch.log(torch.tensor([0.5, 1.0, 2.0, 1.5, 3.0, 6.0]))  # second bin = 3 x first bin
    h = FDivergenceWeight(divergence="js")(logits, t)
    assert torch.allclose(h[:3], h[3:], atol=1e-6)
    h_raw = FDivergenceWeight(divergence="js", ratio_normalization=False)(logits, t)
    assert not torch.allclose(h_raw[:3], h_raw[3:], atol=1e-3)


def test_bin_ema_is_trainer_state_and_round_trips():
    w = FDivergenceWeight(divergence="kl", ratio_ema_rate=0.5)
    t = torch.tensor([25, 30, 500])
    w(torch.log(torch.tensor([2.0, 4.0, 1.0])), t)
    assert torch.allclose(w.ema_mean[0], torch.tensor(3.0, dtype=torch.float64))
    w(torch.log(torch.tensor([1.0, 1.0, 1.0])), t)  # bin 0: 0.5 * 3 + 0.5 * 1 = 2
    assert torch.allclose(w.ema_mean[0], torch.tensor(2.0, dtype=torch.float64))
    state = w.state_dict()
    w2 = FDivergenceWeight(divergence="kl", ratio_ema_rate=0.5)
    w2.load_state_dict(state)
    logits = torch.log(torch.tensor([3.0, 0.5, 2.0]))
    assert torch.equal(w(logits, t, update=False), w2(logits, t, update=False))
    with pytest.raises(ValueError, match="num_bins"):
        FDivergenceWeight(divergence="kl", num_bins=4).load_state_dict(state)


def test_statistics_all_reduce_sums_and_counts():
    """Two 'processes' with unequal shares (exchanging sums through a reduce function) get the weights of
    the single-process batch: bin and batch means are global (sums and counts, not means of means)."""
    g = torch.Generator().manual_seed(1)
    logits, t = torch.randn(40, generator=g) * 2, torch.randint(20, 981, (40,), generator=g)
    full = FDivergenceWeight(divergence="jf")(logits, t)
    slots, barrier = [None, None], threading.Barrier(2)
    results = {}

    def run(rank, sl):
        def reduce(x):
            slots[rank] = x
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total
        results[rank] = FDivergenceWeight(divergence="jf", reduce=reduce)(logits[sl], t[sl])

    threads = [threading.Thread(target=run, args=(0, slice(0, 13))), threading.Thread(target=run, args=(1, slice(13, 40)))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert torch.allclose(torch.cat([results[0], results[1]]), full, atol=1e-6)


def test_bad_ratio_options():
    with pytest.raises(ValueError, match="divergence"):
        RatioConfig(divergence="pearson")
    with pytest.raises(ValueError, match="ratio_lower"):
        RatioConfig(ratio_lower=5.0, ratio_upper=1.0)
    with pytest.raises(ValueError, match="num_bins"):
        RatioConfig(num_bins=0)


# ---------------------------------------------------------------------- DMD gradient
def test_dmd_gradient_closed_form_under_sum_reduction():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, 4, 4, generator=g, requires_grad=True)
    mu_real, mu_fake = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    dmd_loss(x0, mu_real, mu_fake, reduction="sum").backward()
    norm = (x0.detach() - mu_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = (mu_fake - mu_real) / norm
    assert torch.allclose(x0.grad, expected, rtol=1e-6, atol=1e-7)
    assert torch.allclose(dmd_gradient(x0, mu_real, mu_fake), expected)
    # A per-sample weight scales each sample's gradient; mean reduction rescales by the element count.
    x0.grad = None
    w = torch.tensor([0.5, 1.0, 2.0])
    dmd_loss(x0, mu_real, mu_fake, w, reduction="mean").backward()
    assert torch.allclose(x0.grad * x0[0].numel() * 3, expected * w.view(3, 1, 1, 1), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- 1-D oracle checks (spec 2.7)
W_T, M_T, S_T = (0.7, 0.3), (-2.0, 2.0), 0.5  # teacher 0.7 N(-2, 0.5^2) + 0.3 N(2, 0.5^2)


def _log_normal(x, mean, var):
    return -0.5 * (x - mean) ** 2 / var - 0.5 * torch.log(2 * math.pi * torch.as_tensor(var, dtype=torch.float64))


def _teacher_logp_score(x, sigma):
    """log p_t and its score for the two-Gaussian teacher noised at ``sigma`` (exact)."""
    var = S_T**2 + torch.as_tensor(sigma, dtype=torch.float64) ** 2
    a = math.log(W_T[0]) + _log_normal(x, M_T[0], var)
    b = math.log(W_T[1]) + _log_normal(x, M_T[1], var)
    resp_b = torch.sigmoid(b - a)
    score = (M_T[0] + resp_b * (M_T[1] - M_T[0]) - x) / var
    return torch.logaddexp(a, b), score


def _student_logq_score(x, mu, s, sigma):
    var = s**2 + sigma**2
    return _log_normal(x, mu, var), (mu - x) / var


def _quadrature_divergence(div, mu, s, sigma):
    x = torch.linspace(-14, 14, 200001, dtype=torch.float64)
    logp, _ = _teacher_logp_score(x, sigma)
    logq, _ = _student_logq_score(x, torch.tensor(mu, dtype=torch.float64), torch.tensor(s, dtype=torch.float64), sigma)
    q = torch.exp(logq)
    return float(torch.trapezoid(q * f_generator(div, torch.exp(logp - logq)), x))


@pytest.mark.parametrize("div", TABLE)
def test_f_gradient_identity_matches_finite_differences(div):
    """Monte-Carlo E[h(r) (score_q - score_p) dx_t/dtheta] = d D_f / d(mu, s) within 3% (spec 2.7 test 1)."""
    mu, s, sigma, n = 0.5, 0.8, 0.7, 400_000
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, generator=g, dtype=torch.float64)
    eps = torch.randn(n, generator=g, dtype=torch.float64)
    x = mu + s * z + sigma * eps
    logp, score_p = _teacher_logp_score(x, sigma)
    logq, score_q = _student_logq_score(x, torch.tensor(mu, dtype=torch.float64), torch.tensor(s, dtype=torch.float64),
                                        sigma)
    h = h_weight(div, torch.exp(logp - logq)) / H_SCALE[div]  # f''(r) r^2 exactly
    per_sample = h * (score_q - score_p)
    mc = torch.stack([per_sample.mean(), (per_sample * z).mean()])
    d = 1e-4
    fd = torch.tensor([
        (_quadrature_divergence(div, mu + d, s, sigma) - _quadrature_divergence(div, mu - d, s, sigma)) / (2 * d),
        (_quadrature_divergence(div, mu, s + d, sigma) - _quadrature_divergence(div, mu, s - d, sigma)) / (2 * d),
    ], dtype=torch.float64)
    rel = (mc - fd).norm() / fd.norm()
    assert rel < 0.03, (div, mc.tolist(), fd.tolist())


def _oracle_mode_run(div, steps=1500, batch=1024, lr=0.01):
    """SGD on (mu, log s) with exact scores and ratios, sigma log-uniform in [0.05, 1] (spec 2.7 test 3).

    Shortened from the spec's 4000 steps x 4096 samples to keep the test at seconds; measured with the
    spec's setting: rkl -> (1.987, 0.511), kl -> (-0.733, 1.803); with this one (1.987, 0.511), (-0.654, 1.823).
    """
    g = torch.Generator().manual_seed(0)
    mu, log_s = torch.tensor(1.5, dtype=torch.float64), torch.tensor(math.log(0.5), dtype=torch.float64)
    weight = FDivergenceWeight(divergence=div, ratio_normalization=False, logit_clamp=30.0)
    for _ in range(steps):
        s = log_s.exp()
        z = torch.randn(batch, generator=g, dtype=torch.float64)
        eps = torch.randn(batch, generator=g, dtype=torch.float64)
        sigma = torch.exp(torch.empty(batch, dtype=torch.float64).uniform_(math.log(0.05), 0.0, generator=g))
        x = mu + s * z + sigma * eps
        logp, score_p = _teacher_logp_score(x, sigma)
        logq, score_q = _student_logq_score(x, mu, s, sigma)
        h = weight((logp - logq).float(), torch.zeros(batch)).double()
        per_sample = (h * (score_q - score_p)).clamp(-50, 50)
        mu = mu - lr * per_sample.mean()
        log_s = log_s - lr * (per_sample * z).mean() * s
    return float(mu), float(log_s.exp())


def test_oracle_mode_test_rkl_collapses_kl_covers():
    mu, s = _oracle_mode_run("rkl")
    assert abs(mu - 2.0) < 0.2 and s < 0.7, (mu, s)
    mu, s = _oracle_mode_run("kl")
    assert mu < 0.0 and s > 1.3, (mu, s)


# ---------------------------------------------------------------------- methods on tiny networks
def _class_teacher():
    return Denoiser.from_scheduler(tiny_class_unet(), DDPMScheduler())


def _class_batch(seed, b=4, with_real=True):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(b, 1, 8, 8, generator=g)
    real = torch.rand(b, 1, 8, 8, generator=g) * 2 - 1 if with_real else None
    labels = torch.randint(0, 10, (b,), generator=g)
    return Batch(labels=labels, noise=noise, real=real, real_labels=labels, generator=torch.Generator().manual_seed(seed + 100))


def _one_training_round(method, seed):
    """One critic update then one generator update (AdamW per group); returns the losses."""
    opts = {k: torch.optim.AdamW(v, lr=1e-3, weight_decay=0.01) for k, v in method.optimizer_groups().items()}
    out_c = method.critic_loss(_class_batch(seed))
    out_c["loss"].backward()
    for k, o in opts.items():
        if k != "generator":
            o.step()
    for o in opts.values():
        o.zero_grad(set_to_none=True)
    out_g = method.generator_loss(_class_batch(seed + 1))
    out_g["loss"].backward()
    opts["generator"].step()
    for o in opts.values():
        o.zero_grad(set_to_none=True)
    return out_c, out_g


@pytest.mark.parametrize("few_step", [False, True])
def test_fdistill_rkl_equals_dmd2_bit_for_bit(few_step):
    from fastgen.guidance import CFG

    kwargs = dict(r1_weight=10.0, student_timesteps=[999, 500] if few_step else [700])
    torch.manual_seed(0)
    dmd = DMD2(_class_teacher(), guider=CFG(2.0), **kwargs)
    torch.manual_seed(0)
    fd = FDistill(_class_teacher(), guider=CFG(2.0), divergence="rkl", **kwargs)
    for step in range(2):
        (c1, g1), (c2, g2) = _one_training_round(dmd, 10 * step), _one_training_round(fd, 10 * step)
        assert set(c1) == set(c2) and set(g1) == set(g2)
        for k in c1:
            assert torch.equal(c1[k], c2[k]), k
        for k in g1:
            assert torch.equal(g1[k], g2[k]), k
    p1, p2 = dict(dmd.named_parameters()), dict(fd.named_parameters())
    assert p1.keys() == p2.keys()
    for k in p1:
        assert torch.equal(p1[k], p2[k]), k
    # and the update did something: the student moved away from the teacher
    teacher = dict(dmd.teacher_denoiser.model.named_parameters())
    assert any(not torch.equal(v, teacher[k.split("network.", 1)[1]])
               for k, v in p1.items() if k.startswith("student_module.network."))


def test_fdistill_js_weights_differ_from_dmd2_and_keep_state_off_the_student():
    from fastgen.guidance import CFG

    torch.manual_seed(0)
    fd = FDistill(_class_teacher(), guider=CFG(2.0), divergence="js", ratio_ema_rate=0.5)
    _, out_g = _one_training_round(fd, 0)
    assert {"h_min", "h_mean", "h_max"} <= set(out_g)
    assert abs(float(out_g["h_mean"]) - 1.0) < 1e-5
    state = fd.trainer_state()
    assert state["ratio_ema"]["ema_seen"].any()
    assert not any("ema" in k for k in fd.student().state_dict())
    fd2 = FDistill(_class_teacher(), divergence="js", ratio_ema_rate=0.5)
    fd2.load_trainer_state(state)
    assert torch.equal(fd2.weighting.ema_mean, fd.weighting.ema_mean)


def test_method_option_errors():
    teacher = _class_teacher()
    with pytest.raises(ValueError, match="divergence"):
        FDistill(teacher, divergence="pearson")
    with pytest.raises(ValueError, match="gan_weight_discriminator"):
        FDistill(teacher, divergence="kl", gan_weight_discriminator=0.0, gan_weight_generator=0.0)
    with pytest.raises(ValueError, match="dm_time"):
        DMD2(teacher, dm_time=(500, 20))
    with pytest.raises(ValueError, match="gan_features"):
        DMD2(teacher, gan_features="student")
    with pytest.raises(TypeError, match="unknown dmd2 options"):
        DMD2(teacher, gan_loss_weight=1.0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        DMD2(teacher, student_timesteps=[200, 700])
    # plain DMD (no GAN) needs no real data
    dmd = DMD2(teacher, gan_weight_generator=0.0, gan_weight_discriminator=0.0)
    assert not dmd.needs_real_data and "discriminator" not in dmd.optimizer_groups()
    out = dmd.critic_loss(_class_batch(0, with_real=False))
    assert set(out) == {"dsm", "loss"}
    with pytest.raises(ValueError, match="real data"):
        DMD2(teacher).critic_loss(_class_batch(0, with_real=False))


def test_gan_on_fake_score_features_trains_the_fake_score_only_in_the_critic_step():
    torch.manual_seed(0)
    m = DMD2(_class_teacher(), gan_features="fake_score", gan_weight_generator=0.01)
    m.generator_loss(_class_batch(0))["loss"].backward()
    assert all(p.grad is None for p in m.fake_network.parameters())
    assert any(p.grad is not None for p in m.student_module.parameters())
    m.zero_grad(set_to_none=True)
    m.critic_loss(_class_batch(1))["loss"].backward()
    assert m.fake_network.mid_block.resnets[0].conv1.weight.grad is not None
    assert all(p.grad is None for p in m.student_module.parameters())


def _step_changes(method, batch_fn):
    before = {k: v.detach().clone() for k, v in method.named_parameters()}
    opts = {k: torch.optim.AdamW(v, lr=1e-3) for k, v in method.optimizer_groups().items()}
    out_c = method.critic_loss(batch_fn(0))
    out_c["loss"].backward()
    for k, o in opts.items():
        if k != "generator":
            o.step()
            o.zero_grad(set_to_none=True)
    out_g = method.generator_loss(batch_fn(1))
    out_g["loss"].backward()
    opts["generator"].step()
    assert torch.isfinite(out_c["loss"]) and torch.isfinite(out_g["loss"])
    return {k for k, v in method.named_parameters() if not torch.equal(v, before[k])}


def test_lora_student_and_fake_score_share_one_frozen_base():
    pytest.importorskip("peft")
    from fastgen.guidance import CFG

    teacher = _class_teacher()
    base = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    x, t, cond = torch.randn(2, 1, 8, 8), torch.tensor([500, 600]), {"class_labels": torch.tensor([1, 2])}
    ref = teacher(x, t, cond).detach()
    torch.manual_seed(0)
    m = FDistill(teacher, guider=CFG(2.0), divergence="kl", lora_student=True, lora_fake_score=True, lora_rank=4)
    n_base = sum(v.numel() for v in base.values())
    n_all = sum(p.numel() for p in m.parameters())
    n_heads = sum(p.numel() for p in m.discriminator.parameters())
    assert n_all - n_heads - n_base < 0.5 * n_base  # one base + small adapters, not three copies
    assert m.student_module.network is teacher.model
    changed = _step_changes(m, _class_batch)
    assert changed and all("lora_" in k or k.startswith("discriminator.") for k in changed)
    assert any(".student." in k for k in changed) and any(".fake_score." in k for k in changed)
    from fastgen.training.lora import use_adapter

    with use_adapter(teacher.model, None):
        assert torch.equal(teacher(x, t, cond).detach(), ref)  # the teacher is the untouched base
    assert all(torch.equal(v, base[k]) for k, v in teacher.model.state_dict().items() if k in base)
    # exported student: adapter merged into a plain copy, equal to the adapted network
    plain = m.student_network()
    assert not any("lora" in k for k in plain.state_dict())
    with use_adapter(teacher.model, "student"):
        adapted = teacher(x, t, cond).detach()
    assert not torch.allclose(adapted, ref)
    assert torch.allclose(Denoiser(plain, teacher.schedule)(x, t, cond), adapted, atol=1e-5)


def _text_batch_fn(cond_fn, shape):
    def make(seed):
        g = torch.Generator().manual_seed(seed)
        return Batch(labels={"cond": cond_fn(g), "uncond": cond_fn(g)}, noise=torch.randn(*shape, generator=g),
                     real=torch.randn(*shape, generator=g), generator=torch.Generator().manual_seed(seed + 7))
    return make


@pytest.mark.parametrize("arch", ["sd", "sdxl", "dit"])
def test_one_method_step_on_tiny_architectures(arch, tmp_path):
    from fastgen.guidance import CFG

    if arch == "dit":
        net = tiny_dit()
        teacher = Denoiser(net, Denoiser.from_scheduler(net, DDPMScheduler()).schedule, "epsilon")

        def batch_fn(seed):
            g = torch.Generator().manual_seed(seed)
            return Batch(labels=torch.randint(0, 1000, (2,), generator=g), noise=torch.randn(2, 4, 8, 8, generator=g),
                         real=torch.randn(2, 4, 8, 8, generator=g), generator=torch.Generator().manual_seed(seed + 7))
    else:
        pipe = (tiny_sd if arch == "sd" else tiny_sdxl)(tmp_path)
        teacher = Denoiser.from_scheduler(pipe.unet, pipe.scheduler)
        width = 16 if arch == "sd" else 32

        def cond_fn(g):
            c = {"encoder_hidden_states": torch.randn(2, 5, width, generator=g)}
            if arch == "sdxl":
                c["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 16, generator=g),
                                          "time_ids": torch.tensor([[8.0, 8, 0, 0, 8, 8]] * 2)}
            return c
        batch_fn = _text_batch_fn(cond_fn, (2, 4, 8, 8))
    torch.manual_seed(0)
    m = FDistill(teacher, guider=CFG(2.0), divergence="js", r1_weight=1.0, student_timesteps=[999, 499])
    changed = _step_changes(m, batch_fn)
    assert any(k.startswith("student_module.") for k in changed)
    assert any(k.startswith("fake_network.") for k in changed)
    assert any(k.startswith("discriminator.") for k in changed)


def test_feature_tap_stops_after_the_tapped_block_and_head_sizes():
    from fastgen.training.discriminator import DiscriminatorHead, FeatureTap

    unet = tiny_class_unet()
    den = Denoiser.from_scheduler(unet, DDPMScheduler())
    x, t, cond = torch.randn(2, 1, 8, 8), torch.tensor([10, 900]), {"class_labels": torch.tensor([1, 2])}
    seen = []
    unet.up_blocks[0].register_forward_hook(lambda *a: seen.append("up"))
    tap = FeatureTap(unet, ["mid_block", "down_blocks.0"])
    feats = tap.run(den, x, t, cond)
    assert seen == [] and set(feats) == {"mid_block", "down_blocks.0"}  # up blocks skipped
    with tap.capture() as full:
        den(x, t, cond)
    assert seen == ["up"] and torch.equal(full["mid_block"], feats["mid_block"])
    logits = DiscriminatorHead.for_network(unet, ["mid_block", "down_blocks.0"])(feats)
    assert logits.shape == (2,)
    with pytest.raises(ValueError, match="not found"):
        FeatureTap(unet, ["middle"])


# ---------------------------------------------------------------------- DMD's regression term
def _regression_method(**options):
    from diffusers import DDIMScheduler

    from fastgen.pipelines import FastGenClassPipeline
    from fastgen.training.config import DistillConfig
    from fastgen.training.teacher import load_teacher

    torch.manual_seed(0)
    pipe = FastGenClassPipeline(scheduler=DDIMScheduler(clip_sample=False), unet=tiny_class_unet(num_classes=3))
    teacher = load_teacher(DistillConfig(guidance="cfg", guidance_scale=2.0), pipeline=pipe)
    opts = dict(student_timesteps=[500], gan_weight_generator=0.0, gan_weight_discriminator=0.0,
                regression_pairs=6, regression_steps=3)
    return pipe, DMD2(teacher, **{**opts, **options})


def _pair_batch(seed, b=4):
    g = torch.Generator().manual_seed(seed)
    return Batch(labels=torch.randint(0, 3, (b,), generator=g), noise=torch.randn(b, 1, 8, 8, generator=g),
                 real=None, generator=torch.Generator().manual_seed(seed + 1))


def test_regression_pairs_are_the_teacher_pipelines_own_samples():
    """Pair i: the block-drawn noise of regression_seed, class i % C, and the teacher pipeline's guided sample from
    that noise (its scheduler and steps); the same pairs on a second build (every process, every resume)."""
    pipe, m = _regression_method(regression_weight=0.5)
    noise, labels, target = m.regression_pairs()
    assert labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert torch.equal(noise, torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1_000_003)))
    direct = pipe(class_labels=[2], latents=noise[2:3], num_inference_steps=3, guidance_scale=2.0,
                  output_type="latent").images
    assert torch.allclose(target[2:3], direct, atol=1e-5), (target[2], direct)
    _, m2 = _regression_method(regression_weight=0.5)
    assert all(torch.equal(a, b) for a, b in zip(m2.regression_pairs(), (noise, labels, target)))
    assert m.regression_pairs() is m.regression_pairs()  # made once


def test_regression_term_adds_weight_times_pair_mse_and_is_off_by_default():
    _, off = _regression_method()
    assert "regression" not in off.generator_loss(_pair_batch(0))  # DMD2: no term, no pairs made
    assert off.__dict__.get("_regression_pairs") is None
    _, m = _regression_method(regression_weight=0.5)
    _, base = _regression_method(regression_weight=0.0)
    out, ref = m.generator_loss(_pair_batch(1)), base.generator_loss(_pair_batch(1))
    assert torch.allclose(out["dm"], ref["dm"]) and float(out["regression"]) > 0
    assert torch.allclose(out["loss"], ref["loss"] + 0.5 * out["regression"], rtol=1e-6)
    # the value: MSE between the student's one-step output on the drawn pairs' noises and their teacher samples
    noise, labels, target = m.regression_pairs()
    g = _pair_batch(1).generator
    torch.randint(20, 251, (4,), generator=g)  # replay the DM term's draws (t, then eps) before the pair draw
    torch.randn(4, 1, 8, 8, generator=g)
    idx = torch.randint(6, (4,), generator=g)
    with torch.no_grad():
        pred = m.student_module(noise[idx], m._conditions(labels[idx])[0], g, step=0)
    assert torch.allclose(out["regression"], torch.nn.functional.mse_loss(pred, target[idx]), rtol=1e-5)


def test_regression_term_pulls_the_student_to_the_teacher_samples():
    _, m = _regression_method(regression_weight=1.0, dm_loss_weight=0.0)
    opt = torch.optim.AdamW(m.optimizer_groups()["generator"], lr=3e-3)
    g = torch.Generator().manual_seed(5)
    first = float(m.regression_loss(6, torch.Generator().manual_seed(9), "cpu").detach())
    for _ in range(25):
        loss = m.regression_loss(6, g, "cpu")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert float(m.regression_loss(6, torch.Generator().manual_seed(9), "cpu").detach()) < 0.5 * first


def test_regression_options_are_checked():
    from fastgen.training.dmd2 import DMD2Config

    with pytest.raises(ValueError, match="one-step student"):
        DMD2Config(student_timesteps=[500, 250], regression_weight=0.25)
    with pytest.raises(ValueError, match="regression_pairs must be a positive integer"):
        DMD2Config(regression_pairs=0)
    with pytest.raises(ValueError, match="regression_weight must be a non-negative number"):
        DMD2Config(regression_weight=-1.0)
    den = Denoiser.from_scheduler(tiny_class_unet(), DDPMScheduler())
    with pytest.raises(ValueError, match="class-conditional teacher pipeline"):
        DMD2(den, regression_weight=0.5).regression_pairs()


def test_critic_samples_final_trains_the_critics_on_the_students_full_chain(monkeypatch):
    """critic_samples="final": the fake score (and discriminator) of a few-step student learn from its final
    output (the sample), "step" (DMD2) from its x0 at a random step of the chain."""
    seen = {}
    for mode in ("step", "final"):
        torch.manual_seed(0)
        dmd = DMD2(_class_teacher(), student_timesteps=[999, 500, 200], student_renoise="ddim",
                   gan_weight_generator=0.0, gan_weight_discriminator=0.0, critic_samples=mode)
        noised = dmd._noised
        captured = []
        monkeypatch.setattr(dmd, "_noised", lambda x0, t, g: captured.append(x0) or noised(x0, t, g))
        batch = _class_batch(3, with_real=False)
        dmd.critic_loss(batch)
        cond, _ = dmd._conditions(batch.labels)
        sample = dmd.student_module.sample(batch.noise, cond)
        seen[mode] = (captured[0], sample)
    x0, sample = seen["final"]
    assert torch.allclose(x0, sample, atol=1e-6)
    x0, sample = seen["step"]  # this batch's generator draws an earlier step
    assert (x0 - sample).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"critic_samples must be one of \('step', 'final'\)"):
        DMD2(_class_teacher(), critic_samples="last")


def _generator_grad(method, batch):
    method.zero_grad(set_to_none=True)
    method.generator_loss(batch)["loss"].backward()
    return torch.cat([p.grad.reshape(-1) for p in method.student_network().parameters()])


def test_dm_step_weights_weight_the_dm_term_at_the_drawn_step():
    """dm_step_weights: all ones is DMD2 bit for bit (same draws, same gradient); [1, 0] drops the DM term at a
    2-step student's last step only (its gradient is then the GAN term's alone) and is DMD2 at step 0."""
    def make(**options):
        torch.manual_seed(0)
        method = DMD2(_class_teacher(), student_timesteps=[999, 500], student_renoise="ddim",
                      gan_weight_generator=1.0, **options)
        with torch.no_grad():  # a fake score that has moved off the teacher, or the DM term is zero
            for p in method.fake_denoiser.model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        return method

    dmd2, ones, last_off, gan_only = make(), make(dm_step_weights=[1, 1]), make(dm_step_weights=[1, 0]), \
        make(dm_loss_weight=0.0)
    drawn = {seed: int(torch.randint(2, (1,), generator=torch.Generator().manual_seed(seed + 100)))
             for seed in range(6)}
    assert set(drawn.values()) == {0, 1}  # these batches draw both steps
    for seed, step in drawn.items():
        ref = _generator_grad(dmd2, _class_batch(seed))
        assert torch.equal(_generator_grad(ones, _class_batch(seed)), ref)
        off = _generator_grad(last_off, _class_batch(seed))
        if step == 0:
            assert torch.equal(off, ref)
        else:
            assert torch.allclose(off, _generator_grad(gan_only, _class_batch(seed)), atol=1e-7)
            assert (off - ref).abs().max() > 1e-4  # the DM term did contribute
    for bad in ([1.0], [1.0, -1.0], "10"):
        with pytest.raises(ValueError, match=r"dm_step_weights must be one non-negative number per student step"):
            make(dm_step_weights=bad)


def test_dm_step_guidance_sets_the_teacher_cfg_scale_per_student_step():
    """dm_step_guidance: [2, 2] under a CFG-2 teacher is DMD2 (the DM term's teacher x0 is CFG's combination,
    formed in x0 space); [2, 1] is DMD2 at step 0 and, at step 1, DMD2 with an unguided (conditional) teacher.
    A per-row step draw gives each row its own scale."""
    from fastgen.guidance import APG, CFG

    def make(guider="cfg2", **options):
        torch.manual_seed(0)
        method = DMD2(_class_teacher(), guider=CFG(2.0) if guider == "cfg2" else guider, student_timesteps=[999, 500], student_renoise="ddim",
                      gan_weight_generator=0.0, dm_time=(20, 500), **options)
        with torch.no_grad():  # a fake score off the teacher, or the DM gradient is zero
            for p in method.fake_denoiser.model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        return method

    def close(a, b):
        return float((a - b).norm() / b.norm()) < 2e-4  # measured up to 3e-5: DMD normalisation amplifies rounding

    guided, same, split, plain = make(), make(dm_step_guidance=[2, 2]), make(dm_step_guidance=[2, 1]), make(None)
    drawn = {seed: int(torch.randint(2, (1,), generator=torch.Generator().manual_seed(seed + 100)))
             for seed in range(6)}
    assert set(drawn.values()) == {0, 1}
    for seed, step in drawn.items():
        ref = _generator_grad(guided, _class_batch(seed))
        # CFG combined in x0 space vs the network's space: equal up to float rounding (kept small: DM t <= 500)
        assert close(_generator_grad(same, _class_batch(seed)), ref)
        got = _generator_grad(split, _class_batch(seed))
        want = ref if step == 0 else _generator_grad(plain, _class_batch(seed))
        assert close(got, want)
        if step == 1:
            assert not close(got, ref)  # guidance did change the DM term

    # Per-row steps: the teacher x0 of row i uses the scale of row i's step.
    m = make(dm_step_guidance=[3, 1])
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.full((4,), 300)
    cond, uncond = m._conditions(torch.tensor([1, 2, 3, 4]))
    scale = torch.tensor([3.0, 1.0, 1.0, 3.0])
    mixed = m._teacher_x0(x, t, cond, uncond, scale)
    with torch.no_grad():
        c = m.teacher_denoiser.predict(x, t, cond)[0]
        u = m.teacher_denoiser.predict(x, t, uncond)[0]
    assert torch.allclose(mixed[[1, 2]], c[[1, 2]], atol=1e-6)
    assert torch.allclose(mixed[[0, 3]], u[[0, 3]] + 3 * (c[[0, 3]] - u[[0, 3]]), atol=1e-5)

    for bad in ([2.0], [2.0, -1.0], [2.0, float("inf")], "21"):
        with pytest.raises(ValueError, match=r"dm_step_guidance must be one finite guidance scale >= 0 per student"):
            make(dm_step_guidance=bad)
    with pytest.raises(ValueError, match=r"dm_step_guidance .* not CFG"):
        make(guider=APG(2.0), dm_step_guidance=[2, 1])


def test_later_step_target_teacher_trains_step0_as_one_step_and_later_steps_by_teacher_regression():
    """later_step_target="teacher": with weight 0 the generator gradient and the critic loss are a one-step
    DMD2 student's at t_0 bit for bit (step 0 every turn, critics on step-0 outputs); the added loss is the MSE
    between the student's x0 at a random later step (backward-simulated input) and the teacher's x0 there, at
    the CFG scale dm_step_guidance gives that step."""
    from fastgen.guidance import CFG

    def make(**options):
        torch.manual_seed(0)
        method = DMD2(_class_teacher(), guider=CFG(2.0), gan_weight_generator=1.0, **options)
        with torch.no_grad():
            for p in method.fake_denoiser.model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        return method

    few = dict(student_timesteps=[999, 500, 200], student_renoise="ddim", later_step_target="teacher",
               dm_step_guidance=[2, 1, 1.5])
    # (weight 0 without dm_step_guidance: its x0-space CFG differs from the guided teacher's by rounding)
    one, off, on = make(student_timesteps=[999]), make(**{**few, "dm_step_guidance": None}, later_step_weight=0.0), \
        make(**few)
    for seed in range(3):
        ref = _generator_grad(one, _class_batch(seed))
        assert torch.equal(_generator_grad(off, _class_batch(seed)), ref)
        assert (_generator_grad(on, _class_batch(seed)) - ref).abs().max() > 1e-4
        assert torch.equal(off.critic_loss(_class_batch(seed))["loss"], one.critic_loss(_class_batch(seed))["loss"])
    # The default weight (10) scales the regression into the loss. (At a fresh student the regression is 0 at
    # step 1, whose target is the unguided teacher the student was copied from; step 2's CFG 1.5 target is not.)
    assert on.config.later_step_weight == 10.0
    outs = [on.generator_loss(_class_batch(seed)) for seed in range(4)]
    outs = [out for out in outs if out["later_step"] > 1e-7]
    assert outs
    for out in outs:
        rest = out["loss"].detach() - out["dm"] - out["gan"]
        assert torch.allclose(rest, 10.0 * out["later_step"], rtol=0.02, atol=0), (float(rest), float(out["later_step"]))

    # The regression itself, recomputed by hand from the same generator state.
    batch = _class_batch(7)
    cond, uncond = on._conditions(batch.labels)
    g_state = torch.Generator().manual_seed(11)
    for _ in range(4):  # several draws of the later step
        draw = torch.Generator()
        draw.set_state(g_state.get_state())
        k = 1 + int(torch.randint(2, (1,), generator=draw))
        got = on.later_step_loss(batch.noise, cond, uncond, g_state)
        den, student = on.teacher_denoiser, on.student_module
        with torch.no_grad():
            x = batch.noise
            for i in range(k):  # DDIM chain: x_{i+1} = alpha x0 + sigma * (the step's own noise estimate)
                x0, eps = den.__class__.predict(student.denoiser, x, torch.full((4,), student.timesteps[i]), cond)
                a, s = den.alpha_sigma(student.timesteps[i + 1], like=x0)
                x = a * x0 + s * eps
            t = torch.full((4,), student.timesteps[k])
            c, u = den.predict(x, t, cond)[0], den.predict(x, t, uncond)[0]
            target = u + [2, 1, 1.5][k] * (c - u)
            want = torch.nn.functional.mse_loss(student.denoise(x, k, cond), target)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7), (k, float(got), float(want))

    for bad, match in [(dict(later_step_target="x0"), r"later_step_target must be one of \('dm', 'teacher'\)"),
                       (dict(later_step_target="teacher"), "trains the later steps of a few-step student"),
                       (dict(few, dm_step_weights=[1, 0, 0]), "leave dm_step_weights unset"),
                       (dict(few, later_step_weight=-1.0), "later_step_weight must be a finite number >= 0")]:
        with pytest.raises(ValueError, match=match):
            make(**bad)
