"""USF solver schedules and USFScheduler: exact reproduction of diffusers solvers, serialisation, errors."""
import copy
import math
import json

import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler,
                       StableDiffusionPipeline)

from fastgen import FastGenClassPipeline
from fastgen.solvers import SolverSchedule, StepDecision, USFScheduler, available_presets, resolve_solver
from fastgen.solvers.usf import PRESET_REFERENCES, phi, preset_schedule, reference_scheduler, taylor_coefficients
from tiny import tiny_class_unet, tiny_sd

TOL = 1e-4


@pytest.fixture(scope="module")
def unet():
    return tiny_class_unet()


def digits_config(**over):
    """The built-in digits model's scheduler config: DPM-Solver from a linear DDPM, x0 thresholding on."""
    ddpm = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    over = {"thresholding": True, "sample_max_value": 1.0, **over}
    return DPMSolverMultistepScheduler.from_config(ddpm.config, **over).config


def run_loop(unet, scheduler, n, x, scale=3.0):
    """A plain diffusers-protocol loop (scaled outputs stand in for CFG, pushing x0 past the threshold).
    In float64, diffusers' float32 ``sigmas`` are upcast too."""
    scheduler.set_timesteps(n)
    if x.dtype == torch.float64 and hasattr(scheduler, "sigmas"):
        scheduler.sigmas = scheduler.sigmas.double()
    labels = torch.arange(x.shape[0]) % 10
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        with torch.no_grad():
            out = scale * unet(x_in, t.expand(x.shape[0]), class_labels=labels).sample
        x = scheduler.step(out, t, x, return_dict=False)[0]
    return x


# ---------------------------------------------------------------- exact reproduction
@pytest.mark.parametrize("name,n", [(p, 5) for p in sorted(PRESET_REFERENCES)]
                         + [("usf-dpmsolver++-2m", 15), ("usf-deis-3", 15), ("usf-unipc-bh2-2pc", 15)])
def test_presets_reproduce_diffusers(unet, name, n):
    # diffusers' UniPC bh1 turns NaN when the last sigma is 0 (B(h) = -h = -inf); compare it at sigma_min.
    cfg = digits_config(final_sigmas_type="sigma_min") if "bh1" in name else digits_config()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(n))
    if name == "usf-deis-3" and n >= 15:
        # diffusers' DEIS-3 coefficients lose ~1e-4 to float32 sigmas (cancellation in its ind_fn with
        # short steps); with float64 sigmas it agrees to ~6e-7, so compare the algorithms in float64.
        unet, x = copy.deepcopy(unet).double(), x.double()
    ref = run_loop(unet, reference_scheduler(name, cfg, n), n, x.clone())
    usf = run_loop(unet, USFScheduler.from_config(cfg, preset=name), n, x.clone())
    assert torch.isfinite(ref).all()
    assert (ref - usf).abs().max() <= TOL


def test_presets_change_the_result(unet):
    """The reproduction test can fail: different decisions give clearly different samples."""
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    cfg = digits_config()
    outs = {p: run_loop(unet, USFScheduler.from_config(cfg, preset=p), 5, x.clone())
            for p in ("usf-dpmsolver++-2m", "usf-dpmsolver++-2m-heun", "usf-unipc-bh2-2pc", "usf-ddim")}
    vals = list(outs.values())
    for i in range(len(vals)):
        for j in range(i + 1, len(vals)):
            assert (vals[i] - vals[j]).abs().max() > 1e-3


def test_unipc_bh1_zero_final_sigma_is_finite(unet):
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = run_loop(unet, USFScheduler.from_config(digits_config(), preset="usf-unipc-bh1-2pc"), 6, x)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("preset,solver", [("usf-dpmsolver++-2m", "dpmsolver++"), ("usf-unipc-bh2-2pc", "unipc"),
                                           ("usf-deis-2", "deis"), ("usf-ddim", "ddim")])
def test_fastgen_loop_reproduces_diffusers(unet, preset, solver):
    pipe = FastGenClassPipeline(scheduler=DPMSolverMultistepScheduler.from_config(digits_config()), unet=unet)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(class_labels=[1, 7], num_inference_steps=6, seed=0, guidance_scale=3.0, output_type="pt")
    ref = pipe(solver=solver, **kw)
    out = pipe(solver=preset, **kw)
    assert out.nfe == ref.nfe == 12
    assert (ref.images - out.images).abs().max() <= TOL


def test_stock_pipeline_runs_usf_and_saves_it(tmp_path):
    sd = tiny_sd(tmp_path / "tok", scheduler=DPMSolverMultistepScheduler())
    kw = dict(prompt=["a cat"], num_inference_steps=5, guidance_scale=5.0, output_type="np")
    ref = sd(generator=torch.Generator().manual_seed(0), **kw).images
    sd.scheduler = USFScheduler.from_config(sd.scheduler.config, preset="usf-dpmsolver++-2m")
    out = sd(generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(ref - out).max() <= TOL
    sd.save_pretrained(tmp_path / "saved")
    cfg = json.loads((tmp_path / "saved" / "scheduler" / "scheduler_config.json").read_text())
    assert cfg["_class_name"] == "USFScheduler" and cfg["preset"] == "usf-dpmsolver++-2m"
    for loader in (StableDiffusionPipeline, DiffusionPipeline):
        back = loader.from_pretrained(tmp_path / "saved")
        back.set_progress_bar_config(disable=True)
        assert isinstance(back.scheduler, USFScheduler)
        assert abs(back(generator=torch.Generator().manual_seed(0), **kw).images - out).max() == 0


# ---------------------------------------------------------------- schedules
def searched_like(afs="zero_x0") -> SolverSchedule:
    steps = [StepDecision("data", 1), StepDecision("noise", 2, "linear", 0.3, "pseudo", "unipc-bh1"),
             StepDecision("data", 3, corrector="pseudo"), StepDecision("data", 2, "dpmsolver-2"),
             StepDecision("data", 1)]
    return SolverSchedule([999.0, 700.5, 400.25, 150.0, 40.0], steps, afs=afs, name="test")


def test_schedule_json_round_trip_and_nfe(tmp_path):
    s = searched_like()
    assert s.nfe == 4 and s.num_steps == 5
    s.save(tmp_path / "s.json")
    back = SolverSchedule.load(tmp_path / "s.json")
    assert back.to_dict() == s.to_dict()
    assert SolverSchedule.from_json(s.to_json()).steps == s.steps


def test_fixed_schedule_in_pipeline_uses_its_nfe(unet, tmp_path):
    pipe = FastGenClassPipeline(scheduler=DPMSolverMultistepScheduler.from_config(digits_config()), unet=unet)
    pipe.set_progress_bar_config(disable=True)
    path = tmp_path / "nfe4.json"
    searched_like().save(path)
    for solver in (path, str(path), searched_like()):
        out = pipe([3], num_inference_steps=4, seed=0, guidance_scale=1.0, solver=solver, output_type="pt")
        assert out.nfe == 4 and torch.isfinite(out.images).all()
    no_afs = pipe([3], num_inference_steps=5, seed=0, guidance_scale=1.0, solver=searched_like("none"), output_type="pt")
    assert no_afs.nfe == 5
    with pytest.raises(ValueError, match="num_inference_steps must match the schedule's NFE"):
        pipe([3], num_inference_steps=7, seed=0, solver=path)


def test_taylor_order1_is_ddim_and_phi_is_stable():
    a_s, s_s, a_t, s_t = 0.3, (1 - 0.09) ** 0.5, 0.8, 0.6
    import math
    l_s, l_t = math.log(a_s / s_s), math.log(a_t / s_t)
    cx, (c0,) = taylor_coefficients("data", 1, l_s, l_t, a_s, s_s, a_t, s_t, [])
    # DDIM: x_t = a_t x0 + s_t eps with eps = (x_s - a_s x0) / s_s
    assert abs(cx - s_t / s_s) < 1e-14 and abs(c0 - (a_t - s_t * a_s / s_s)) < 1e-14
    for n in (1, 2, 3, 4):
        assert abs(phi(n, 1e-9) - (1 / math.factorial(n) + 1e-9 / math.factorial(n + 1))) < 1e-15
        assert abs(phi(n, 0.49) - phi(n, 0.51)) < 0.02


# ---------------------------------------------------------------- errors
def test_bad_inputs_are_clear_value_errors(tmp_path):
    base = DPMSolverMultistepScheduler()
    with pytest.raises(ValueError, match="usf-dpmsolver\\+\\+-2m"):
        resolve_solver("usf-nope", base)
    with pytest.raises(ValueError, match="preset must be one of"):
        USFScheduler(preset="dpm")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        resolve_solver(str(tmp_path / "missing.json"), base)
    with pytest.raises(ValueError, match="order must be"):
        StepDecision("data", 5).validate()
    with pytest.raises(ValueError, match="prediction must be one of"):
        SolverSchedule([999.0], [StepDecision("x0", 1)])
    with pytest.raises(ValueError, match="strictly decreasing"):
        SolverSchedule([500.0, 600.0], [StepDecision(), StepDecision()])
    bad = searched_like().to_dict()
    bad["nfe"] = 9
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="nfe=9"):
        SolverSchedule.load(tmp_path / "bad.json")
    (tmp_path / "junk.json").write_text("{nope")
    with pytest.raises(ValueError, match="not valid JSON"):
        SolverSchedule.load(tmp_path / "junk.json")


def test_every_preset_expands():
    cfg = digits_config()
    for name in available_presets():
        s = preset_schedule(name, 7, cfg)
        assert s.num_steps == 7 and s.name == name
    assert DDIMScheduler.from_config(cfg).config.thresholding  # DDIM from this config thresholds x0 too


# ---------------------------------------------------------------- S³ search (toy metric, no model)
def toy_space(nfe=4):
    from fastgen.schedule import NoiseSchedule
    from fastgen.solvers.search import SearchSpace
    ns = NoiseSchedule.from_scheduler_config(digits_config())
    return SearchSpace(nfe=nfe, t_max=ns.t_max, t_min=ns.t_min, lambda_of=ns.lambda_, t_of_lambda=ns.t_from_lambda)


def test_search_is_resumable_logs_and_improves(tmp_path):
    from fastgen.solvers.search import search
    target = [0.0, 0.5, 0.7, 0.85]

    def metric(s):  # prefers a grid near `target` and data prediction: a known optimum to move towards
        u = s.meta["u"]
        pad = u + [1.0] * (len(target) - len(u))
        return 0.01 + sum((a - b) ** 2 for a, b in zip(pad, target)) + 0.1 * sum(x.prediction != "data" for x in s.steps)

    state, log = tmp_path / "s.state.json", tmp_path / "s.log.jsonl"
    first = search(toy_space(), metric, budget=14, state_path=state, log_path=log, seed=1, proposals=32)
    assert len(first) == 14 and len(log.read_text().splitlines()) == 14
    more = search(toy_space(), metric, budget=30, state_path=state, log_path=log, seed=1, proposals=32)
    assert len(more) == 30 and len(log.read_text().splitlines()) == 30  # resumed, not restarted
    seeds_best = min(r["metric"] for r in more if r["round"] == 0)
    assert more[0]["metric"] < seeds_best  # the search found something better than its starting points
    best = SolverSchedule.from_dict(more[0]["schedule"])
    assert best.nfe == 4


def test_cli_errors_name_the_argument(tmp_path, capsys):
    from fastgen.cli import main
    assert main(["search-schedule", "--nfe", "0", "--out", str(tmp_path / "a.json")]) == 2
    assert "--nfe" in capsys.readouterr().err
    assert main(["search-schedule", "--nfe", "5", "--out", str(tmp_path / "a.txt")]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["teleport-stats", "--out", str(tmp_path / "a.pt")]) == 2
    assert "--out" in capsys.readouterr().err


def test_cli_teleport_stats_from_data(tmp_path):
    from fastgen.cli import main
    from fastgen.teleport import GaussianStats
    out = tmp_path / "stats.npz"
    assert main(["teleport-stats", "--out", str(out), "--json"]) == 0
    stats = GaussianStats.load(out)
    assert stats.shape == (1, 16, 16) and stats.rank == 256 and stats.total_variance > 1


# ---------------------------------------------------------------- start points, implicit corrector, average_x0
def _gaussian_vp():
    """An exact eps-model for Gaussian data (d=16, rank 5) under the digits VP schedule, and its closed-form flow."""
    from fastgen.schedule import NoiseSchedule
    from fastgen.teleport import GaussianStats
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    stats = GaussianStats(torch.randn(16, generator=g, dtype=torch.float64) * 0.5,
                          torch.tensor([4.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64), u[:, :5], 0.0)
    ns = NoiseSchedule.from_scheduler_config(digits_config())

    def ab(t):
        a, s = ns.alpha_sigma(torch.tensor(float(t), dtype=torch.float64))
        return float(a), float(s)

    def model(x, t):
        a, s = ab(t)
        dev = x - a * stats.mean
        x0 = stats.mean + (a * stats.eigenvalues / (a * a * stats.eigenvalues + s * s) * (dev @ stats.eigenvectors)) \
            @ stats.eigenvectors.T
        return (x - a * x0) / s
    return ns, stats, ab, model


def _solve_gaussian(decide, n, x):
    """Run a USFScheduler with per-step decisions ``decide(i)`` on n lambda-uniform steps down to t = 0;
    return (max error against the closed-form PF-ODE solution, NFE, evaluations made)."""
    from fastgen.solvers.usf import logsnr_uniform_timesteps
    from fastgen.teleport import teleport
    ns, stats, ab, model = _gaussian_vp()
    times = logsnr_uniform_timesteps(ns, n, t_min=0.0)
    sched = SolverSchedule(times, [decide(i) for i in range(n)], final_timestep=0.0)
    sc = USFScheduler.from_config(digits_config(thresholding=False), schedule=sched)
    sc.set_timesteps()
    y, calls = x.clone(), 0
    for t in sc.timesteps:
        y = sc.step(model(y, t), t, y, return_dict=False)[0]
        calls += 1
    (a0, s0), (a1, s1) = ab(times[0]), ab(0.0)
    ref = teleport(x, stats, alpha_from=a0, sigma_from=s0, alpha_to=a1, sigma_to=s1)
    return float((y - ref).abs().max()), sched.nfe, calls


@pytest.mark.parametrize("name,decision,order", [
    ("ddim", StepDecision("data", 1), 1),
    ("order 1 + pseudo corrector", StepDecision("data", 1, corrector="pseudo"), 2),
    ("order 1 + implicit corrector", StepDecision("data", 1, corrector="implicit"), 2),
    ("order 2", StepDecision("data", 2), 2),
    ("order 2 + implicit corrector", StepDecision("data", 2, corrector="implicit"), 3),
    ("order 3 from start point -2", StepDecision("data", 3, start_point=-2), 3),
])
def test_usf_decisions_converge_at_their_order(name, decision, order):
    """On an exact Gaussian model every decision converges to the closed-form ODE solution, at its order
    (observed slope of log error vs log steps, 20 -> 40 -> 80 steps); implicit correctors cost one NFE each."""
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    runs = [_solve_gaussian(lambda i: decision, n, x) for n in (20, 40, 80)]
    slopes = [math.log2(runs[j][0] / runs[j + 1][0]) for j in range(2)]
    assert order - 0.2 <= slopes[-1] <= order + 1.7, (name, slopes)
    for n, (_, nfe, calls) in zip((20, 40, 80), runs):
        assert nfe == calls == (2 * n - 1 if decision.corrector == "implicit" else n)


def test_start_point_order1_is_a_ddim_jump_from_the_older_point():
    ns, stats, ab, model = _gaussian_vp()
    times, final = [999.0, 600.0], 100.0
    sched = SolverSchedule(times, [StepDecision("data", 1), StepDecision("data", 1, start_point=-2)], final_timestep=final)
    sc = USFScheduler.from_config(digits_config(thresholding=False), schedule=sched)
    sc.set_timesteps()
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = x.clone()
    for t in sc.timesteps:
        y = sc.step(model(y, t), t, y, return_dict=False)[0]
    (a0, s0), (af, sf) = ab(times[0]), ab(final)
    x0 = (x - s0 * model(x, times[0])) / a0
    assert (y - ((sf / s0) * x + (af - sf * a0 / s0) * x0)).abs().max() < 1e-12  # DDIM t0 -> final
    sched.steps[1].start_point = -1  # the multistep step from the newer point differs
    sc = USFScheduler.from_config(digits_config(thresholding=False), schedule=sched)
    sc.set_timesteps()
    z = x.clone()
    for t in sc.timesteps:
        z = sc.step(model(z, t), t, z, return_dict=False)[0]
    assert (z - y).abs().max() > 1e-3


def test_average_x0_first_step_and_round_trip(unet, tmp_path):
    mean = [[[0.25 * ((i + j) % 3 - 1) for j in range(8)] for i in range(8)]]
    steps = [StepDecision("data", 1), StepDecision("data", 2, corrector="implicit", start_point=-1),
             StepDecision("data", 2, corrector="pseudo"), StepDecision("data", 1)]
    sched = SolverSchedule([999.0, 700.0, 400.0, 150.0], steps, afs="average_x0", afs_x0=mean)
    assert sched.nfe == 4 and sched.num_evals == 4  # 4 steps - analytical first + 1 implicit
    sched.save(tmp_path / "s.json")
    assert SolverSchedule.load(tmp_path / "s.json").to_dict() == sched.to_dict()
    sc = USFScheduler.from_config(digits_config(), schedule=tmp_path / "s.json")
    sc.set_timesteps(4)
    assert sc.timesteps.tolist() == [700, 400, 400, 150]  # the implicit corrector re-evaluates at 400
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    first = sc.scale_model_input(x, sc.timesteps[0])
    ns = sc.noise_schedule
    (a0, s0), (a1, s1) = (tuple(float(v) for v in ns.alpha_sigma(torch.tensor(t, dtype=torch.float64))) for t in (999.0, 700.0))
    expect = (s1 / s0) * x + (a1 - s1 * a0 / s0) * torch.tensor(mean)  # DDIM with x0 := mean
    assert (first - expect).abs().max() < 1e-6
    pipe = FastGenClassPipeline(scheduler=DPMSolverMultistepScheduler.from_config(digits_config()), unet=unet)
    pipe.set_progress_bar_config(disable=True)
    out = pipe([3, 5], num_inference_steps=4, seed=0, guidance_scale=2.0, solver=sched, output_type="pt")
    assert out.nfe == 8 and torch.isfinite(out.images).all()  # 4 evaluations x 2 (CFG)


def test_new_decisions_reject_bad_values():
    with pytest.raises(ValueError, match="start_point"):
        StepDecision("data", 2, start_point=0).validate()
    with pytest.raises(ValueError, match="corrector"):
        StepDecision("data", 2, corrector="explicit").validate()
    with pytest.raises(ValueError, match="afs_x0"):
        SolverSchedule([999.0, 500.0], [StepDecision(), StepDecision()], afs="average_x0")
    with pytest.raises(ValueError, match="implicit"):
        SolverSchedule([999.0, 500.0], [StepDecision(corrector="implicit"), StepDecision()], targets=[400.0, None])
    sched = SolverSchedule([999.0, 500.0, 200.0], [StepDecision(corrector="implicit"), StepDecision(), StepDecision()])
    sc = USFScheduler.from_config(digits_config(), schedule=sched)
    sc.set_timesteps()
    with pytest.raises(ValueError, match="implicit-corrector evaluation"):
        sc.set_begin_index(1)


def test_search_moves_keep_the_nfe_with_implicit_correctors_and_afs():
    """Mutation and crossover may add implicit correctors (+1 NFE each), change the analytical first step
    or the start points; the step count must follow so every candidate costs exactly the searched NFE."""
    import random
    from fastgen.solvers.search import crossover, mutate, seed_candidates
    for nfe in (2, 5):
        space = toy_space(nfe)
        space.data_mean = 0.1
        rng = random.Random(nfe)
        pop = seed_candidates(space)
        assert {c.afs for c in pop} == {"none", "zero_x0", "average_x0"}
        seen = set()
        for _ in range(400):
            a = rng.choice(pop)
            c = mutate(space, a, rng) if rng.random() < 0.7 else crossover(space, a, rng.choice(pop), rng)
            assert c.nfe == nfe, c.to_dict()
            seen |= {s.corrector for s in c.steps} | {f"start{s.start_point}" for s in c.steps} | {c.afs}
            pop.append(c)
        assert {"implicit", "pseudo", "start-2", "average_x0", "zero_x0"} <= seen


@pytest.mark.parametrize("name", ["usf-unipc-bh2-2pc", "usf-unipc-bh1-2pc", "usf-dpmsolver++-2m", "usf-deis-2"])
def test_presets_reproduce_diffusers_after_set_begin_index(unet, name):
    """img2img / teleport start: history is empty at the begin index, so the first step is order 1 and
    UniPC's corrector after it is the relaxed order-2 one, as in diffusers."""
    cfg = digits_config(final_sigmas_type="sigma_min") if "bh1" in name else digits_config()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(2)
    outs = []
    for sched in (reference_scheduler(name, cfg, 8), USFScheduler.from_config(cfg, preset=name)):
        sched.set_timesteps(8)
        sched.set_begin_index(3)
        y = x.clone()
        for t in sched.timesteps[3:]:
            with torch.no_grad():
                out = 3.0 * unet(y, t.expand(2), class_labels=labels).sample
            y = sched.step(out, t, y, return_dict=False)[0]
        outs.append(y)
    assert (outs[0] - outs[1]).abs().max() <= TOL


def test_crossover_inherits_either_parents_final_step_half_the_time():
    """Regression: ``rng.random() < 0.5 and a.final is None or b.final is None`` (precedence) gave the child
    b's clean-data final step whenever b had one; each parent's final target must win with probability 1/2."""
    import random
    from fastgen.solvers.search import crossover, make_schedule, seed_candidates
    space = toy_space(4)
    plain = [c for c in seed_candidates(space) if c.afs == "none"]
    first = plain[0]
    second = next(c for c in plain[1:] if c.num_steps == first.num_steps)
    with_final = make_schedule(space, list(first.meta["u"]), first.steps, "none", final_zero=False)
    to_zero = make_schedule(space, list(second.meta["u"]), second.steps, "none", final_zero=True)
    assert with_final.final_timestep is not None and to_zero.final_timestep is None
    rng = random.Random(0)
    for a, b in [(with_final, to_zero), (to_zero, with_final)]:
        kept = [crossover(space, a, b, rng).final_timestep is None for _ in range(300)]
        assert 0.4 < sum(kept) / len(kept) < 0.6, (a.final_timestep, b.final_timestep, sum(kept))
    for parent in (with_final, to_zero):  # same final target in both parents: always that one
        assert {crossover(space, parent, parent, rng).final_timestep for _ in range(20)} == {parent.final_timestep}


def test_search_predictor_leaves_the_global_rng_alone(tmp_path):
    """Regression: the S³ predictor reseeded the global torch RNG (``torch.manual_seed``) on every round; it
    now draws its initial weights from a local generator (same weights as before, still seeded)."""
    from fastgen.solvers.search import Predictor, search
    torch.manual_seed(1234)
    before = torch.random.get_rng_state()
    pred = Predictor(12, seed=3)
    pred.fit([[float(i == j) for j in range(12)] for i in range(12)], [1.0 + i for i in range(12)], iters=5)
    pred.predict([[0.0] * 12])
    assert torch.equal(torch.random.get_rng_state(), before)
    again = Predictor(12, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(again.net.parameters(), Predictor(12, seed=3).net.parameters()))
    assert not torch.equal(again.net[0].weight, Predictor(12, seed=4).net[0].weight)
    records = search(toy_space(), lambda s: 0.01 + sum(s.meta["u"]), budget=16, state_path=tmp_path / "s.json",
                     log_path=tmp_path / "s.log", seed=0, proposals=16)
    assert max(r["round"] for r in records) >= 1  # a predictor round ran
    assert torch.equal(torch.random.get_rng_state(), before)
