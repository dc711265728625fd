"""Analytical teleportation: closed form vs accurate ODE integration, statistics, pipeline use."""
import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from fastgen.teleport import GaussianStats, resolve_teleport, teleport

D, RANK = 16, 5


def gaussian_stats(residual=0.0) -> GaussianStats:
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    lam = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64)  # rank 5 of 16: rank-deficient
    return GaussianStats(torch.randn(D, generator=g, dtype=torch.float64) * 0.5, lam, u[:, :RANK], residual)


# alpha(lambda), sigma(lambda), d log alpha / d lambda for each schedule family
SCHEDULES = {
    "vp": (lambda l: math.sqrt(1 / (1 + math.exp(-2 * l))), lambda l: math.sqrt(1 / (1 + math.exp(2 * l))),
           lambda l: 1 / (1 + math.exp(2 * l))),
    "edm": (lambda l: 1.0, lambda l: math.exp(-l), lambda l: 0.0),
    "flow": (lambda l: 1 / (1 + math.exp(-l)), lambda l: 1 / (1 + math.exp(l)), lambda l: 1 / (1 + math.exp(l))),
}


def exact_eps(x, lam_t, kind, stats):
    """E[eps | x_t] for data N(mu, Sigma) (posterior mean of the Gaussian model)."""
    alpha, sigma, _ = SCHEDULES[kind]
    a, s = alpha(lam_t), sigma(lam_t)
    mu, u, ev, lr = stats.mean.numpy(), stats.eigenvectors.numpy(), stats.eigenvalues.numpy(), stats.residual_variance
    dev = x - a * mu
    c = u.T @ dev
    x0 = mu + u @ (a * ev / (a * a * ev + s * s) * c) + a * lr / (a * a * lr + s * s) * (dev - u @ c)
    return (x - a * x0) / s


def ode_solve(x, lam_from, lam_to, kind, stats):
    """DPM-Solver's semi-linear PF-ODE dx/dlambda = (d log alpha/d lambda) x - sigma eps(x), DOP853 at 1e-12."""
    _, sigma, dlog_alpha = SCHEDULES[kind]

    def f(lam, y):
        return dlog_alpha(lam) * y - sigma(lam) * exact_eps(y, lam, kind, stats)

    sol = solve_ivp(f, (lam_from, lam_to), x, method="DOP853", rtol=1e-12, atol=1e-12)
    assert sol.success
    return sol.y[:, -1]


# (lambda at the start, at the teleport target, at the end of sampling)
LAMBDAS = {"vp": (-5.0, -1.0, 3.0), "edm": (-math.log(80.0), -math.log(1.5), -math.log(0.01)),
           "flow": (-6.0, -1.5, 4.0)}


@pytest.mark.parametrize("kind", ["vp", "edm", "flow"])
@pytest.mark.parametrize("residual", [0.0, 0.3])
def test_closed_form_matches_ode(kind, residual):
    stats = gaussian_stats(residual)
    alpha, sigma, _ = SCHEDULES[kind]
    l0, l1, l2 = LAMBDAS[kind]
    x_start = np.random.default_rng(1).standard_normal((1, D)) * sigma(l0) + alpha(l0) * stats.mean.numpy()

    def jump(x, la, lb):
        return teleport(torch.from_numpy(x), stats, alpha_from=alpha(la), sigma_from=sigma(la),
                        alpha_to=alpha(lb), sigma_to=sigma(lb)).numpy()

    for x in x_start:
        ref_mid = ode_solve(x, l0, l1, kind, stats)
        assert np.abs(jump(x[None], l0, l1)[0] - ref_mid).max() < 1e-8
        # teleport to the intermediate level, then solve the rest: equals the full ODE solution
        full = ode_solve(x, l0, l2, kind, stats)
        tele_then_solve = ode_solve(jump(x[None], l0, l1)[0], l1, l2, kind, stats)
        assert np.abs(tele_then_solve - full).max() < 1e-5


def test_zero_step_teleport_is_identity_and_wrong_jump_fails():
    stats = gaussian_stats()
    x = torch.randn(2, D, dtype=torch.float64)
    same = teleport(x, stats, alpha_from=0.3, sigma_from=0.9539392014169457, alpha_to=0.3, sigma_to=0.9539392014169457)
    assert torch.equal(same, x) or (same - x).abs().max() < 1e-15
    # a naive DDIM-style rescaling is not the Gaussian flow: the comparison above can fail
    naive = x * 0.5
    moved = teleport(x, stats, alpha_from=0.3, sigma_from=0.95, alpha_to=0.8, sigma_to=0.6)
    assert (moved - naive).abs().max() > 1e-2


def test_stats_from_samples_full_and_low_rank(tmp_path):
    stats = gaussian_stats()
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4000, RANK, generator=g, dtype=torch.float64)
    x = stats.mean + (z * stats.eigenvalues.sqrt()) @ stats.eigenvectors.T
    full = GaussianStats.from_samples(x.reshape(-1, 1, 4, 4))
    assert full.shape == (1, 4, 4) and full.rank == D
    emp_total = float(x.var(0, unbiased=True).sum())
    assert abs(full.total_variance - emp_total) < 1e-8  # eigenvalue sum = total variance
    assert full.eigenvalues.min() >= 0 and full.eigenvalues[RANK:].max() < 1e-10  # rank-deficient, clamped
    low = GaussianStats.from_samples(x, max_full_dim=4, explained_variance=0.95)
    assert low.rank < RANK + 1 and float(low.eigenvalues.sum()) / low.total_variance >= 0.95
    assert abs(low.total_variance - emp_total) < 1e-8
    for suffix in (".safetensors", ".npz"):
        low.save(tmp_path / f"s{suffix}")
        back = GaussianStats.load(tmp_path / f"s{suffix}")
        assert torch.equal(back.eigenvectors, low.eigenvectors) and back.residual_variance == low.residual_variance
        assert back.shape == low.shape


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        GaussianStats.load(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="must be a .safetensors or .npz"):
        GaussianStats.load(tmp_path / "stats.pt")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="could not be read"):
        GaussianStats.load(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="x must have shape"):
        teleport(torch.zeros(2, 3), gaussian_stats(), alpha_from=0.1, sigma_from=0.99, alpha_to=0.5, sigma_to=0.8)
    with pytest.raises(ValueError, match="teleport must be None"):
        resolve_teleport(3)
    with pytest.raises(ValueError, match="eigenvectors must have shape"):
        GaussianStats(torch.zeros(4), torch.ones(2), torch.zeros(4, 3))


def test_pipeline_accepts_stats_and_path(tmp_path):
    from diffusers import DPMSolverMultistepScheduler

    from fastgen import FastGenClassPipeline
    from tiny import tiny_class_unet
    pipe = FastGenClassPipeline(scheduler=DPMSolverMultistepScheduler(), unet=tiny_class_unet())
    pipe.set_progress_bar_config(disable=True)
    stats = GaussianStats.from_samples(torch.rand(64, 1, 8, 8) * 2 - 1)
    stats.save(tmp_path / "t.safetensors")
    kw = dict(class_labels=[1, 2], num_inference_steps=10, seed=0, guidance_scale=1.0, output_type="pt")
    base = pipe(**kw)
    out = pipe(teleport=stats, teleport_fraction=0.3, **kw)
    assert out.nfe == 7 and base.nfe == 10
    loaded = pipe(teleport=resolve_teleport(str(tmp_path / "t.safetensors")), teleport_fraction=0.3, **kw)
    assert torch.equal(out.images, loaded.images)
    zero = pipe(teleport=stats, teleport_fraction=0.0, **kw)
    assert torch.equal(zero.images, base.images)  # a zero-step teleport is bit-identical to the baseline


# ---------------------------------------------------------------- class-wise and guided teleport
def two_gaussians():
    """A class Gaussian and an unconditional one with different eigenbases (they do not commute)."""
    g = torch.Generator().manual_seed(5)
    u2, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    other = GaussianStats(torch.randn(D, generator=g, dtype=torch.float64) * 0.3,
                          torch.tensor([3.0, 1.5, 0.7, 0.2, 0.05, 0.01], dtype=torch.float64), u2[:, :6], 0.02)
    return gaussian_stats(), other


def guided_ode_solve(x, lam_from, lam_to, cond, uncond, w):
    """VP guided PF-ODE in DPM-Solver++ form d(x/sigma)/dlambda = e^lambda D_w(x), DOP853 at 1e-12."""
    alpha, sigma, _ = SCHEDULES["vp"]

    def x0(st, xx, a, s):
        mu, u, ev, lr = st.mean.numpy(), st.eigenvectors.numpy(), st.eigenvalues.numpy(), st.residual_variance
        dev = xx - a * mu
        c = u.T @ dev
        return mu + u @ (a * ev / (a * a * ev + s * s) * c) + a * lr / (a * a * lr + s * s) * (dev - u @ c)

    def f(lam, y):
        a, s = alpha(lam), sigma(lam)
        xx = y * s
        d_u = x0(uncond, xx, a, s)
        return math.exp(lam) * (d_u + w * (x0(cond, xx, a, s) - d_u))

    sol = solve_ivp(f, (lam_from, lam_to), x / sigma(lam_from), method="DOP853", rtol=1e-12, atol=1e-12)
    assert sol.success
    return sol.y[:, -1] * sigma(lam_to)


@pytest.mark.parametrize("w", [1.0, 3.0, 0.0])
def test_guided_teleport_matches_accurate_ode(w):
    from fastgen.teleport import guided_teleport
    cond, uncond = two_gaussians()
    alpha, sigma, _ = SCHEDULES["vp"]
    l0, l1 = -5.0, -1.0
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((3, D)))
    out = guided_teleport(x, cond, uncond, w, alpha_from=alpha(l0), sigma_from=sigma(l0), alpha_to=alpha(l1),
                          sigma_to=sigma(l1))
    for i in range(3):
        ref = guided_ode_solve(x[i].numpy(), l0, l1, cond, uncond, w)
        assert np.abs(out[i].numpy() - ref).max() < 1e-7
    if w == 1.0:  # no guidance: the class's closed form
        closed = teleport(x, cond, alpha_from=alpha(l0), sigma_from=sigma(l0), alpha_to=alpha(l1), sigma_to=sigma(l1))
        assert (out - closed).abs().max() < 1e-8
    if w == 3.0:  # guidance moves the result: the comparison can fail
        plain = teleport(x, cond, alpha_from=alpha(l0), sigma_from=sigma(l0), alpha_to=alpha(l1), sigma_to=sigma(l1))
        assert (out - plain).abs().max() > 1e-2


def test_class_stats_fit_save_bind_and_pipeline(tmp_path):
    from diffusers import DPMSolverMultistepScheduler

    from fastgen import FastGenClassPipeline
    from fastgen.teleport import ClassGaussianStats
    from tiny import tiny_class_unet
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    x = torch.randn(60, 1, 8, 8, generator=g) * 0.3 + labels.reshape(-1, 1, 1, 1) * 0.5 - 0.5
    cs = ClassGaussianStats.from_samples(x, labels, max_full_dim=0, explained_variance=0.99)
    assert sorted(cs.classes) == [0, 1, 2] and cs.unconditional is not None and cs.shape == (1, 8, 8)
    assert torch.allclose(cs.classes[2].mean, x[labels == 2].double().mean(0))
    cs.save(tmp_path / "c.safetensors")
    back = resolve_teleport(str(tmp_path / "c.safetensors"))
    assert isinstance(back, ClassGaussianStats) and torch.equal(back.classes[1].eigenvectors, cs.classes[1].eigenvectors)
    kw = dict(alpha_from=0.05, sigma_from=(1 - 0.05**2) ** 0.5, alpha_to=0.6, sigma_to=0.8)
    z = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    rows = cs.for_labels([2, 0, 2, 7])(z, **kw)  # label 7 has no class fit: the unconditional one
    assert torch.allclose(rows[0], teleport(z[:1], cs.classes[2], **kw)[0])
    assert torch.allclose(rows[1], teleport(z[1:2], cs.classes[0], **kw)[0])
    assert torch.allclose(rows[3], teleport(z[3:], cs.unconditional, **kw)[0])
    with pytest.raises(ValueError, match="class labels"):
        cs(z, **kw)
    with pytest.raises(ValueError, match="no teleport statistics for labels"):
        ClassGaussianStats(dict(cs.classes)).for_labels([5])
    with pytest.raises(ValueError, match="not a class statistics file"):
        ClassGaussianStats.load(_saved_plain(tmp_path))
    pipe = FastGenClassPipeline(scheduler=DPMSolverMultistepScheduler(), unet=tiny_class_unet())
    pipe.set_progress_bar_config(disable=True)
    call = dict(class_labels=[1, 2], num_inference_steps=10, seed=0, output_type="pt", teleport_fraction=0.3)
    guided = pipe(teleport=cs, guidance_scale=3.0, **call)
    assert guided.nfe == 14 and torch.isfinite(guided.images).all()
    assert torch.equal(pipe(teleport=str(tmp_path / "c.safetensors"), guidance_scale=3.0, **call).images, guided.images)
    plain = pipe(teleport=cs.unconditional, guidance_scale=3.0, **call)
    assert (plain.images - guided.images).abs().max() > 1e-4  # the class-wise guided jump is a different start


def _saved_plain(tmp_path):
    path = tmp_path / "plain.safetensors"
    gaussian_stats().save(path)
    return path


def test_resolve_teleport_passes_class_stats_through_and_dead_helpers_are_gone(tmp_path):
    """Regression for the removed dead code: ``ClassGaussianStats`` is callable, so ``resolve_teleport``
    returns it through the callable branch (its own branch could not run); ``teleport_grid_index`` had no user."""
    import fastgen.teleport as tp
    cond, uncond = two_gaussians()
    cs = tp.ClassGaussianStats({0: cond}, uncond)
    assert resolve_teleport(cs) is cs and resolve_teleport(cond) is cond and resolve_teleport(None) is None
    cs.save(tmp_path / "c.safetensors")
    assert isinstance(resolve_teleport(tmp_path / "c.safetensors"), tp.ClassGaussianStats)
    cond.save(tmp_path / "g.safetensors")
    assert isinstance(resolve_teleport(str(tmp_path / "g.safetensors")), GaussianStats)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="bad.safetensors"):  # a corrupt file is named, not a SafetensorError
        resolve_teleport(tmp_path / "bad.safetensors")
    assert not hasattr(tp, "teleport_grid_index")
