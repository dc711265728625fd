"""Released thu-nics/USF solver schedules: safe loading, conversion to SolverSchedule, NFE, time mapping."""
import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

from fastgen.schedule import NoiseSchedule
from fastgen.solvers import StepDecision, USFScheduler, from_usf_decisions, load_usf_decisions
from fastgen.solvers.usf_import import released_lambda, released_time_from_lambda, usf_nfe_from_filename

torch.set_num_threads(1)


def digits_config(**over):
    """The built-in digits model's scheduler config (linear DDPM betas), as in test_solvers.py."""
    ddpm = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    over = {"thresholding": False, **over}
    return DPMSolverMultistepScheduler.from_config(ddpm.config, **over).config


def _gaussian_vp():
    """An exact eps-model for Gaussian data (d=16, rank 5) under the digits VP schedule (as in test_solvers.py)."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    mean = torch.randn(16, generator=g, dtype=torch.float64) * 0.5
    lam, vec = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64), u[:, :5]
    ns = NoiseSchedule.from_scheduler_config(digits_config())

    def model(x, t):
        a, s = (float(v) for v in ns.alpha_sigma(torch.tensor(float(t), dtype=torch.float64)))
        x0 = mean + (a * lam / (a * a * lam + s * s) * ((x - a * mean) @ vec)) @ vec.T
        return (x - a * x0) / s
    return ns, model


# ---------------------------------------------------------------- decisions in the released format
def deriv(order, points=None, relaxation=None, coef=None, estimate=None):
    """A released ``derivative_types[i]`` list: one dict per derivative 1..order-1."""
    out = []
    for j in range(order - 1):
        entry = {"estimate": f"Difference_{estimate or order - 1}",
                 "active_points": None if points is None else list(points),
                 "relaxation": relaxation if j == 0 else None}
        if coef is not None and j == 0:
            entry["relaxation_coefficient"] = coef
        out.append(entry)
    return out


def corrector(kind, start, order, points, relaxation=None):
    """A released ``corrector_types[i]`` dict (the step redone at order+1 from the same point)."""
    if kind == "no_corrector":
        return {"type": "no_corrector", "start_point": None, "taylor_order": None, "derivative_type": None}
    c_points = [p - 1 for p in points] + [-1]
    dts = [{"estimate": f"Difference_{order}", "active_points": list(c_points),
            "relaxation": relaxation if j == 0 else None} for j in range(order)]
    return {"type": kind, "start_point": start - 1, "taylor_order": order + 1, "derivative_type": dts}


NONE = corrector("no_corrector", -1, 1, [])


def multistep_data_afs():
    """Discrete-VP (latent-diffusion) style: data prediction, pseudo correctors, zero_x0 AFS, 6 steps = NFE 5."""
    t = torch.tensor([1.0, 0.8, 0.55, 0.3, 0.15, 0.06, 0.01])  # float32, as the released tensors
    return {
        "timesteps": t,
        "orders": [1, 1, 2, 3, 3, 2],
        "prediction_types": ["data_prediction"] * 6,
        "start_points": [-1] * 6,
        "derivative_types": [[], [], deriv(2, [-2], "linear", 0.3), deriv(3, [-3, -2]),
                             deriv(3, [-3, -2]), deriv(2, [-2], "unipc-bh2")],
        "corrector_types": [NONE, corrector("pseudo", -1, 1, [], "unipc-bh1"),
                            corrector("pseudo", -1, 2, [-2]), corrector("pseudo", -1, 3, [-3, -2]),
                            corrector("pseudo", -1, 3, [-3, -2]), NONE],
        "afs": "zero_x0",
        "skip_coefficients": torch.linspace(1.0, 1.0, 15),
    }


def edm_implicit():
    """EDM-sigma style: zero_x0 AFS with a noise-prediction first step, an implicit corrector: NFE 4 - 1 + 1."""
    return {
        "timesteps": torch.tensor([80.0, 20.0, 5.0, 1.0, 0.05]),
        "orders": [1, 1, 2, 1],
        "prediction_types": ["noise_prediction", "data_prediction", "data_prediction", "noise_prediction"],
        "start_points": [-1, -1, -1, -1],
        "derivative_types": [[], [], deriv(2, [-2], "dpmsolver-2"), []],
        "corrector_types": [NONE, corrector("pseudo", -1, 1, []), corrector("implicit", -1, 2, [-2]), NONE],
        "afs": "zero_x0",
        "skip_coefficients": torch.ones(15),
    }


def noise_start2():
    """Score-SDE (VP continuous) style: noise prediction, start point -2, a pseudo corrector; NFE 4."""
    return {
        "timesteps": torch.tensor([1.0, 0.6, 0.35, 0.12, 0.002]),
        "orders": [1, 1, 2, 2],
        "prediction_types": ["noise_prediction"] * 4,
        "start_points": [-1, -2, -2, -1],
        "derivative_types": [[], [], deriv(2, None), deriv(2, [-2], "linear", -0.2)],
        "corrector_types": [NONE, NONE, corrector("pseudo", -2, 2, [-1]), NONE],
        "afs": "no_afs",
        "skip_coefficients": torch.ones(15),
    }


def _run(schedule):
    """Run the converted schedule in a USFScheduler on the exact Gaussian model; return (sample, evaluations)."""
    ns, model = _gaussian_vp()
    sc = USFScheduler.from_config(digits_config(), schedule=schedule)
    sc.set_timesteps(schedule.nfe)
    y = torch.randn(3, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for t in sc.timesteps:
        x_in = sc.scale_model_input(y, t)
        y = sc.step(model(x_in, t), t, y, return_dict=False)[0]
    return y, len(sc.timesteps)


def _round_trip(schedule, released, convention, ns):
    ours = torch.tensor(schedule.timesteps + [schedule.final_timestep], dtype=torch.float64)
    back = released_time_from_lambda(ns.lambda_(ours), convention, alphas_cumprod=getattr(ns, "alphas_cumprod", None))
    assert (back - released.double()).abs().max() < 1e-9


# ---------------------------------------------------------------- conversions
def test_multistep_data_prediction_with_pseudo_correctors_and_afs(tmp_path):
    ns, _ = _gaussian_vp()
    dec = multistep_data_afs()
    path = tmp_path / "stable_diffusion_nfe5.pth"
    torch.save(dec, path)
    loaded = load_usf_decisions(path)
    sched = from_usf_decisions(loaded, noise_schedule=ns, time_convention="discrete", name="sd5",
                               expected_nfe=usf_nfe_from_filename(path))
    assert sched.nfe == 5 and sched.num_steps == 6 and sched.afs == "zero_x0" and sched.name == "sd5"
    assert sched.steps == [
        StepDecision("data", 1),
        StepDecision("data", 1, corrector="pseudo", corrector_relaxation="unipc-bh1"),
        StepDecision("data", 2, "linear", -0.3, "pseudo"),  # released 1 + c h; fastgen 1 + coef (-h) for data
        StepDecision("data", 3, corrector="pseudo"),
        StepDecision("data", 3, corrector="pseudo"),
        StepDecision("data", 2, "unipc-bh2"),
    ]
    _round_trip(sched, dec["timesteps"], "discrete", ns)
    # discrete time t = (n + 1) / N on the model's own table lands on integer network timesteps
    assert sched.timesteps[0] == pytest.approx(999.0, abs=1e-9) and sched.timesteps[1] == pytest.approx(799.0, abs=1e-3)
    src = sched.meta["usf_source"]
    assert src["time_convention"] == "discrete" and src["nfe"] == 5 and src["afs"] == "zero_x0"
    assert src["released_timesteps"] == [float(v) for v in dec["timesteps"].tolist()]
    assert src["skip_coefficients"] == [1.0] * 15
    sched.to_json()  # meta stays JSON-serialisable
    y, evals = _run(sched)
    assert evals == 5 and torch.isfinite(y).all()


def test_implicit_corrector_and_edm_zero_x0(tmp_path):
    ns, model = _gaussian_vp()
    dec = edm_implicit()
    path = tmp_path / "cifar10_edm_nfe4.pth"
    torch.save({"decisions": dec, "fid": 9.9}, path)
    sched = from_usf_decisions(load_usf_decisions(path), noise_schedule=ns, time_convention="edm_sigma",
                               expected_nfe=4)
    assert sched.nfe == 4 and sched.num_evals == 4
    # EDM codebase: zero_x0 with noise prediction sets eps := x_T / sigma_T, i.e. x0 := 0
    assert sched.afs == "average_x0" and sched.afs_x0 == 0.0
    assert sched.steps[1:] == [StepDecision("data", 1, corrector="pseudo"),
                               StepDecision("data", 2, "dpmsolver-2", corrector="implicit"),
                               StepDecision("noise", 1)]
    _round_trip(sched, dec["timesteps"], "edm_sigma", ns)
    lam = ns.lambda_(torch.tensor(sched.timesteps, dtype=torch.float64))
    assert torch.allclose(lam, -torch.log(dec["timesteps"][:-1].double()), atol=1e-9, rtol=0)
    y, evals = _run(sched)
    assert evals == 4 and torch.isfinite(y).all()
    # the AFS jump is the released one: sigma_1 / sigma_0 * x (x0 = 0) in VP form
    sc = USFScheduler.from_config(digits_config(), schedule=sched)
    sc.set_timesteps()
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (a0, s0), (a1, s1) = (tuple(float(v) for v in ns.alpha_sigma(torch.tensor(t, dtype=torch.float64)))
                          for t in sched.timesteps[:2])
    assert (sc.scale_model_input(x, sc.timesteps[0]) - (s1 / s0) * x).abs().max() < 1e-12
    with pytest.raises(ValueError, match="NFE 4 .* but 5 was expected"):
        from_usf_decisions(dec, noise_schedule=ns, time_convention="edm_sigma", expected_nfe=5)


def test_noise_prediction_with_start_point_minus_2(tmp_path):
    ns, _ = _gaussian_vp()
    dec = noise_start2()
    path = tmp_path / "cifar10_sde_nfe4.pth"
    torch.save([dec, 12.3], path)  # the search's [decisions, metric] form
    sched = from_usf_decisions(load_usf_decisions(path), noise_schedule=ns, time_convention="vp_continuous",
                               expected_nfe=4)
    assert sched.nfe == 4 and sched.afs == "none"
    assert sched.steps == [StepDecision("noise", 1), StepDecision("noise", 1, start_point=-2),
                           StepDecision("noise", 2, corrector="pseudo", start_point=-2),
                           StepDecision("noise", 2, "linear", -0.2)]  # noise prediction: same sign
    _round_trip(sched, dec["timesteps"], "vp_continuous", ns)
    lam = released_lambda(dec["timesteps"], "vp_continuous")
    assert torch.allclose(ns.lambda_(torch.tensor(sched.timesteps, dtype=torch.float64)), lam[:-1], atol=1e-9, rtol=0)
    y, evals = _run(sched)
    assert evals == 4 and torch.isfinite(y).all()


def test_dropped_relaxation_on_second_derivative_is_noted():
    ns, _ = _gaussian_vp()
    dec = multistep_data_afs()
    dec["derivative_types"][3][1]["relaxation"] = "dpmsolver-2"  # the released sampler ignores it
    sched = from_usf_decisions(dec, noise_schedule=ns, time_convention="discrete")
    assert sched.steps[3] == StepDecision("data", 3, corrector="pseudo")
    assert any("step 3.derivative[2]" in n for n in sched.meta["usf_source"]["notes"])


# ---------------------------------------------------------------- what cannot be represented
def _edit(fn):
    dec = multistep_data_afs()
    fn(dec)
    return dec


def _set(key, i, value):
    def fn(dec):
        dec[key][i] = value
    return fn


UNSUPPORTED = [
    ("v3", _set("prediction_types", 3, "dpmsolver_v3_prediction"), "step 3: prediction 'dpmsolver_v3"),
    ("low-order estimate", _set("derivative_types", 3, deriv(3, [-2], estimate=1)[:1] + deriv(3, [-3, -2])[1:]),
     r"step 3.derivative\[1\]: Difference_1"),
    ("other points", _set("derivative_types", 5, deriv(2, [-3])), r"step 5.derivative\[1\]: active points \[-3\]"),
    ("0.5exp", _set("derivative_types", 2, deriv(2, [-2], "0.5exp")), "step 2.derivative.*relaxation '0.5exp'"),
    ("order 4", lambda d: (d["orders"].__setitem__(5, 4), d["derivative_types"].__setitem__(5, deriv(4, [-4, -3, -2]))),
     "step 5: Taylor order 4"),
    ("afs point reused", lambda d: (d["orders"].__setitem__(1, 2), d["derivative_types"].__setitem__(1, deriv(2, [-2])),
                                    d["corrector_types"].__setitem__(1, NONE)), "step 1: uses the analytical-first-step"),
    ("final corrector", _set("corrector_types", 5, corrector("pseudo", -1, 2, [-2])), "step 5: a pseudo corrector on the final"),
    ("corrector elsewhere", lambda d: d["corrector_types"][2].__setitem__("start_point", -3), "step 2: corrector"),
    ("skip coefficients", lambda d: d.__setitem__("skip_coefficients", torch.full((15,), 0.9)), "skip_coefficients"),
    ("out of range", lambda d: d["timesteps"].__setitem__(0, 1.5), "step 0: released time 1.5"),
]


@pytest.mark.parametrize("label,edit,message", UNSUPPORTED, ids=[u[0] for u in UNSUPPORTED])
def test_unsupported_decisions_raise_naming_the_step(tmp_path, label, edit, message):
    ns, _ = _gaussian_vp()
    path = tmp_path / "bad_nfe5.pth"
    torch.save(_edit(edit), path)
    dec = load_usf_decisions(path)
    with pytest.raises(ValueError, match=message):
        from_usf_decisions(dec, noise_schedule=ns, time_convention="discrete", expected_nfe=5)


def test_conventions_and_final_clamp():
    ns, _ = _gaussian_vp()
    dec = edm_implicit()
    with pytest.raises(ValueError, match="time_convention must be one of .*edm_sigma.*vp_continuous.*discrete"):
        from_usf_decisions(dec, noise_schedule=ns, time_convention="sigma")
    dec["timesteps"][-1] = 0.002  # EDM's sigma_min is cleaner than this model's t = 0 (sigma ~ 0.01)
    with pytest.raises(ValueError, match="the final target: released time 0.002.*clamp_final=True"):
        from_usf_decisions(dec, noise_schedule=ns, time_convention="edm_sigma")
    sched = from_usf_decisions(dec, noise_schedule=ns, time_convention="edm_sigma", clamp_final=True)
    assert sched.final_timestep == 0.0 and sched.meta["usf_source"]["final_clamped"]
    dec["prediction_types"][0] = "data_prediction"  # EDM zero_x0 then means eps := x_T in VE scale
    with pytest.raises(ValueError, match="step 0: afs 'zero_x0'"):
        from_usf_decisions(dec, noise_schedule=ns, time_convention="edm_sigma", clamp_final=True)
    avg = edm_implicit()
    avg["afs"] = "average_x0"
    with pytest.raises(ValueError, match="pass afs_x0"):
        from_usf_decisions(avg, noise_schedule=ns, time_convention="edm_sigma")
    sched = from_usf_decisions(avg, noise_schedule=ns, time_convention="edm_sigma", afs_x0=[0.1] * 16,
                               expected_nfe=4)
    assert sched.afs == "average_x0" and sched.afs_x0 == [0.1] * 16


# ---------------------------------------------------------------- safe loading
class NotAllowed:
    """Any class outside torch's weights_only allowlist."""

    def __init__(self):
        self.payload = 1


def test_load_refuses_non_allowlisted_objects_and_bad_files(tmp_path):
    path = tmp_path / "evil_nfe5.pth"
    dec = multistep_data_afs()
    dec["extra"] = NotAllowed()
    torch.save(dec, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_usf_decisions(path)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_usf_decisions(tmp_path / "missing.pth")
    torch.save({"timesteps": torch.ones(3), "orders": [1, 1]}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="missing keys"):
        load_usf_decisions(tmp_path / "partial.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_usf_decisions(tmp_path / "junk.pth")
    assert usf_nfe_from_filename("codebases/edm/solver_schedules/cifar10_edm_nfe10.pth") == 10


# ---------------------------------------------------------------- equivalence with the released algorithm
def _released_sampler(dec, times, ns, model, x, eval_times=None):
    """An independent re-statement of the released sampler's semantics (per-derivative Taylor systems on
    the listed active points, relaxation of derivative 1, correctors redoing the step, the AFS point kept
    in the history with eps := x_T), run at the converted network times of the target model."""
    import math

    def evaluate(x, t, eps=None):
        a, s = (float(v) for v in ns.alpha_sigma(torch.tensor(t, dtype=torch.float64)))
        eps = model(x, t) if eps is None else eps
        return {"lam": math.log(a / s), "a": a, "s": s, "x": x, "eps": eps, "x0": (x - s * eps) / a}

    def update(hist, t, order, pred, start, dtypes):
        a_t, s_t = (float(v) for v in ns.alpha_sigma(torch.tensor(t, dtype=torch.float64)))
        base = hist[start]
        h = math.log(a_t / s_t) - base["lam"]
        z = h if pred == "noise_prediction" else -h
        phis, prev, fac = [], math.exp(z), 1.0
        for i in range(order):
            fac *= max(i, 1)
            prev = (prev - 1.0 / fac) / z
            phis.append(prev)
        key = "eps" if pred == "noise_prediction" else "x0"
        sign, scale = (-1.0, s_t) if pred == "noise_prediction" else (1.0, a_t)
        out = ((a_t / base["a"]) if pred == "noise_prediction" else (s_t / base["s"])) * base["x"]
        out = out + sign * scale * h * phis[0] * base[key]
        for i in range(1, order):
            entry = dtypes[i - 1]
            m = int(entry["estimate"].split("_")[1])
            pts = entry["active_points"] or ([p for p in range(start + 1, 0)] + list(range(start - 1, -len(hist) - 1, -1)))[:m]
            dl = torch.tensor([hist[p]["lam"] - base["lam"] for p in pts], dtype=torch.float64)
            mat = torch.stack([dl**k / math.factorial(k) for k in range(1, m + 1)])
            w = torch.linalg.solve(mat, torch.eye(m, dtype=torch.float64)[i - 1])
            deriv_i = sum(float(w[j]) * (hist[p][key] - base[key]) for j, p in enumerate(pts))
            if i == 1 and entry["relaxation"] == "linear":
                deriv_i = deriv_i * (1 + entry.get("relaxation_coefficient", 0) * h)
            elif i == 1 and entry["relaxation"] in ("dpmsolver-2", "unipc-bh2"):
                deriv_i = deriv_i * 0.5 * z * math.expm1(z) / (math.expm1(z) - z)
            elif i == 1 and entry["relaxation"] == "unipc-bh1":
                deriv_i = deriv_i * 0.5 * z * z / (math.expm1(z) - z)
            out = out + sign * scale * h ** (i + 1) * phis[i] * deriv_i
        return out

    n = len(dec["orders"])
    ev = times if eval_times is None else eval_times
    hist = [evaluate(x, ev[0], eps=x if dec["afs"] == "zero_x0" else None)]
    for i in range(n):
        pred = dec["prediction_types"][i]
        x = update(hist, times[i + 1], dec["orders"][i], pred, dec["start_points"][i], dec["derivative_types"][i])
        c = dec["corrector_types"][i]
        if c["type"] != "no_corrector":
            hist.append(evaluate(x, ev[i + 1]))
            x = update(hist, times[i + 1], c["taylor_order"], pred, c["start_point"], c["derivative_type"])
            hist[-1]["x"] = x
        elif i < n - 1:
            hist.append(evaluate(x, ev[i + 1]))
    return x


@pytest.mark.parametrize("make,convention", [(multistep_data_afs, "discrete"), (noise_start2, "vp_continuous")])
def test_converted_schedule_matches_the_released_algorithm(make, convention):
    ns, model = _gaussian_vp()
    dec = make()
    sched = from_usf_decisions(dec, noise_schedule=ns, time_convention=convention)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # USFScheduler evaluates (and expands around) fractional VP timesteps rounded to float32, and lands
    # its steps on the exact ones; the reference does the same
    times = sched.timesteps + [sched.final_timestep]
    rounded = [float(torch.tensor(t, dtype=torch.float32)) for t in sched.timesteps] + [sched.final_timestep]
    ref = _released_sampler(dec, times, ns, model, x, eval_times=rounded)
    y, _ = _run(sched)
    assert (y - ref).abs().max() < 1e-9
