"""Load the searched solver schedules released with S³/USF and convert them to :class:`SolverSchedule`.

Liu, Ning, Yang, Wang, *A Unified Sampling Framework for Solver Searching of Diffusion Probabilistic Models* (ICLR 2024, arXiv:2312.07243); schedules from https://github.com/thu-nics/USF (``codebases/*/solver_schedules/*_nfe{3..10}.pth``).

Released format (a ``torch.save`` of plain containers; read here with ``weights_only=True``). The file holds
the *decisions* dict itself, or ``{"decisions": {...}, ...}``, or the search's ``[decisions, metric]``:

* ``timesteps``: float tensor of N+1 decreasing times ``t_0 > ... > t_N``; step i goes ``t_i -> t_{i+1}``
  and the model is evaluated at ``t_0 .. t_{N-1}``. The time is the search codebase's own variable:
  EDM sigma (``codebases/edm``: ``lambda = -log t``, 80 -> 0.002..0.003), the linear VP-SDE time
  (``codebases/score_sde``: t in [eps, 1], beta 0.1 -> 20) or DPM-Solver's discrete-VP time
  (``codebases/latent_diffusion``, ``imagenet256``: ``t = (n + 1) / N`` on the model's ``alphas_cumprod``,
  log-alpha interpolated linearly in t).
* ``orders``, ``prediction_types`` (``"noise_prediction"``, ``"data_prediction"``,
  ``"dpmsolver_v3_prediction"``), ``start_points`` (-1, -2, ...): one per step.
* ``derivative_types``: per step a list with one dict per derivative 1..k-1: ``estimate``
  (``"Difference_m"``: a Taylor system on m history points), ``active_points`` (negative history
  indices, or None for "the newer points, then the older ones"), ``relaxation`` (None,
  ``"no_relaxation"``, ``"linear"`` with ``relaxation_coefficient``, ``"dpmsolver-2"``, ``"unipc-bh1"``,
  ``"unipc-bh2"``, ``"0.5exp"``, ``"-0.5exp"``; the released sampler applies it to derivative 1 only).
* ``corrector_types``: per step ``{"type": "no_corrector"|"pseudo"|"implicit", "start_point",
  "taylor_order", "derivative_type"}`` (the corrector's own start point, order and derivative list).
* ``afs``: ``"no_afs"``, ``"zero_x0"`` or ``"average_x0"``; ``skip_coefficients``: a tensor scaling the
  U-Net skip connections (all ones = unchanged).

Times are mapped to the target model's network timesteps through lambda (the half log-SNR), so a
schedule searched on one discretisation runs on another at the same noise levels.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .usf import MAX_ORDER, MAX_START, SolverSchedule, StepDecision

TIME_CONVENTIONS = ("edm_sigma", "vp_continuous", "discrete")
REQUIRED_KEYS = ("timesteps", "orders", "prediction_types", "start_points", "derivative_types", "corrector_types")
_PREDICTIONS = {"noise_prediction": "noise", "data_prediction": "data"}
_NAMED_RELAXATIONS = ("dpmsolver-2", "unipc-bh1", "unipc-bh2")
_NO_RELAXATION = (None, "no_relaxation", "none")
_CORRECTORS = ("no_corrector", "pseudo", "implicit")


# ---------------------------------------------------------------------------------------------- loading
def load_usf_decisions(path: str | os.PathLike) -> dict[str, Any]:
    """Read a released USF ``.pth`` safely (``torch.load(weights_only=True)``: only tensors and plain
    containers, never arbitrary pickled objects) and return its decisions dict.

    Accepts the decisions dict, ``{"decisions": {...}}`` and the search's ``[decisions, metric]``.
    Raises FileNotFoundError if the file is missing, ValueError (naming the file) if it cannot be read that
    way or lacks the decision keys."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"USF schedule file {str(path)!r} does not exist.")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle.UnpicklingError, RuntimeError, EOFError, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot read {str(path)!r} as a USF schedule with torch.load(weights_only=True) "
                         f"(only tensors and plain containers are allowed): {first}") from None
    return _unwrap(obj, str(path))


def _unwrap(obj: Any, where: str = "decisions") -> dict[str, Any]:
    if isinstance(obj, (list, tuple)) and len(obj) == 2 and isinstance(obj[0], Mapping):
        obj = obj[0]  # the search's [decisions, metric]
    if isinstance(obj, Mapping) and "decisions" in obj and isinstance(obj["decisions"], Mapping):
        obj = obj["decisions"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: expected a USF decisions dict, got {type(obj).__name__}.")
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        raise ValueError(f"{where}: not a USF decisions dict, missing keys {missing} "
                         f"(expected {list(REQUIRED_KEYS)} and optionally 'afs', 'skip_coefficients').")
    return dict(obj)


def usf_nfe_from_filename(path: str | os.PathLike) -> int | None:
    """The NFE a released file name states (``..._nfe5.pth`` -> 5), or None."""
    m = re.search(r"nfe(\d+)", Path(path).name)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------- time conventions
def _check_convention(time_convention: str) -> str:
    if time_convention not in TIME_CONVENTIONS:
        raise ValueError(f"time_convention must be one of {TIME_CONVENTIONS} ('edm_sigma': codebases/edm, "
                         "'vp_continuous': codebases/score_sde, 'discrete': codebases/latent_diffusion and "
                         f"imagenet256), got {time_convention!r}.")
    return time_convention


def _discrete_tables(alphas_cumprod) -> tuple[torch.Tensor, torch.Tensor]:
    """DPM-Solver's discrete VP time grid: log-alpha table (log-SNR clipped at -5.1 near t = T, which
    shortens the table) and times ``(n + 1) / N``."""
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).reshape(-1)
    log_alpha = 0.5 * torch.log(ac)
    lam = log_alpha - 0.5 * torch.log1p(-torch.exp(2 * log_alpha))
    cut = int((lam < -5.1).sum())  # the clipped entries sit at the end (lambda decreases with n)
    if cut:
        log_alpha = log_alpha[:-cut]
    n = len(log_alpha)
    return log_alpha, torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64)[1:]


def _interp_extrap(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation on increasing ``xp``, extrapolating with the end segments."""
    idx = torch.searchsorted(xp, x, right=True).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    return f0 + (x - x0) * (f1 - f0) / (x1 - x0)


def released_lambda(times, time_convention: str, *, alphas_cumprod=None, beta_min: float = 0.1,
                    beta_max: float = 20.0) -> torch.Tensor:
    """Half log-SNR of released times under their codebase's noise schedule (float64)."""
    _check_convention(time_convention)
    t = torch.as_tensor(times, dtype=torch.float64)
    if time_convention == "edm_sigma":
        return -torch.log(t)
    if time_convention == "vp_continuous":
        log_alpha = -0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min
    else:
        if alphas_cumprod is None:
            raise ValueError("time_convention='discrete' needs the released model's alphas_cumprod.")
        table, grid = _discrete_tables(alphas_cumprod)
        log_alpha = _interp_extrap(t.reshape(-1), grid, table).reshape(t.shape)
    return log_alpha - 0.5 * torch.log(-torch.expm1(2 * log_alpha))


def released_time_from_lambda(lam, time_convention: str, *, alphas_cumprod=None, beta_min: float = 0.1,
                              beta_max: float = 20.0) -> torch.Tensor:
    """Inverse of :func:`released_lambda` (float64)."""
    _check_convention(time_convention)
    lam = torch.as_tensor(lam, dtype=torch.float64)
    if time_convention == "edm_sigma":
        return torch.exp(-lam)
    if time_convention == "vp_continuous":
        tmp = 2.0 * (beta_max - beta_min) * torch.logaddexp(-2.0 * lam, torch.zeros_like(lam))
        return tmp / (torch.sqrt(beta_min**2 + tmp) + beta_min) / (beta_max - beta_min)
    if alphas_cumprod is None:
        raise ValueError("time_convention='discrete' needs the released model's alphas_cumprod.")
    table, grid = _discrete_tables(alphas_cumprod)
    log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)
    return _interp_extrap(log_alpha.reshape(-1), table.flip(0), grid.flip(0)).reshape(lam.shape)


# ---------------------------------------------------------------------------------------------- conversion
def _plain(value: Any) -> Any:
    """A JSON-able copy (tensors -> lists)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().double().tolist() if value.is_floating_point() else value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _int(value: Any, what: str) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an integer, got {value!r}.")
    return value


def _estimate_count(entry: Mapping, what: str) -> int:
    est = entry.get("estimate")
    m = re.fullmatch(r"Difference_(\d+)", str(est)) if isinstance(est, str) else None
    if m is None:
        raise ValueError(f"{what}: unsupported derivative estimate {est!r} (only 'Difference_m' exists in USF).")
    return int(m.group(1))


def _released_active_points(entry: Mapping, count: int, start: int, n_points: int, what: str) -> list[int]:
    """The history points a released derivative uses: its explicit ``active_points``, or the released
    default (the points newer than the start point, nearest first, then the older ones)."""
    given = entry.get("active_points")
    if given is None:
        newer = list(range(start + 1, 0))
        older = list(range(start - 1, -n_points - 1, -1))
        points = (newer + older)[:count]
    else:
        points = [_int(p, f"{what}.active_points") for p in list(given)]
    if len(points) != count or len(set(points)) != count:
        raise ValueError(f"{what}: active points {points} do not give {count} distinct points (Difference_{count}).")
    if start in points or any(not -n_points <= p <= -1 for p in points):
        raise ValueError(f"{what}: active points {points} must be distinct history points other than the start "
                         f"point {start}, within the {n_points} available.")
    return points


def _relaxation(entry: Mapping, prediction: str, what: str) -> tuple[str, float]:
    """(fastgen relaxation, relaxation_coef) for a released first-derivative relaxation."""
    kind = entry.get("relaxation")
    if kind in _NO_RELAXATION:
        return "none", 0.0
    if kind == "linear":
        coef = float(_plain(entry.get("relaxation_coefficient", 0.0)) or 0.0)
        if coef == 0.0:
            return "none", 0.0
        # released: 1 + c h for both predictions; fastgen: 1 + coef z with z = -h for data prediction
        return "linear", (-coef if prediction == "data" else coef)
    if kind in _NAMED_RELAXATIONS:
        return kind, 0.0  # same formulas, with -h for data prediction in both
    raise ValueError(f"{what}: relaxation {kind!r} has no fastgen equivalent "
                     f"(supported: None, 'no_relaxation', 'linear', {list(_NAMED_RELAXATIONS)}).")


def _derivatives(dtypes: Any, order: int, start: int, n_points: int, prediction: str, ours: set[int],
                 what: str, notes: list[str]) -> tuple[str, float]:
    """Check a released derivative list against fastgen's rule (all derivatives jointly from the
    ``order - 1`` most recent other points); return the first derivative's relaxation."""
    if order == 1:
        return "none", 0.0  # the released sampler reads no derivative entry at order 1
    dtypes = list(dtypes) if isinstance(dtypes, (list, tuple)) else None
    if dtypes is None or len(dtypes) != order - 1 or not all(isinstance(d, Mapping) for d in dtypes):
        raise ValueError(f"{what}: order {order} needs a list of {order - 1} derivative dicts, got {dtypes!r}.")
    relax = ("none", 0.0)
    for j, entry in enumerate(dtypes, start=1):
        w = f"{what}.derivative[{j}]"
        m = _estimate_count(entry, w)
        if m != order - 1:
            raise ValueError(f"{w}: Difference_{m} estimates derivative {j} from {m} points; fastgen estimates "
                             f"every derivative of an order-{order} step from exactly {order - 1} points "
                             "(low- or high-order derivative estimation is not representable).")
        points = _released_active_points(entry, m, start, n_points, w)
        if set(points) != ours:
            raise ValueError(f"{w}: active points {sorted(points, reverse=True)} differ from fastgen's rule "
                             f"(the {order - 1} most recent points other than the start point: "
                             f"{sorted(ours, reverse=True)}).")
        if j == 1:
            relax = _relaxation(entry, prediction, w)
        elif entry.get("relaxation") not in _NO_RELAXATION:
            notes.append(f"{w}: relaxation {entry.get('relaxation')!r} dropped (the released sampler only "
                         "relaxes the first derivative)")
    return relax


def _our_points(start: int, count: int) -> set[int]:
    """fastgen's derivative points: the ``count`` most recent history points other than the start point."""
    return set([p for p in range(-1, -count - 3, -1) if p != start][:count])


def from_usf_decisions(decisions: Mapping[str, Any], *, noise_schedule, time_convention: str, name: str = "",
                       expected_nfe: int | None = None, afs_x0: Any = None, alphas_cumprod=None,
                       beta_min: float = 0.1, beta_max: float = 20.0,
                       clamp_final: bool = False) -> SolverSchedule:
    """Convert released USF decisions to a :class:`SolverSchedule` for a model with ``noise_schedule``.

    Args:
        decisions: the dict from :func:`load_usf_decisions` (wrapped forms are accepted too).
        noise_schedule: the target model's :class:`fastgen.schedule.NoiseSchedule`.
        time_convention: the time variable of the released file's codebase: ``"edm_sigma"``
            (``codebases/edm``), ``"vp_continuous"`` (``codebases/score_sde``, linear VP-SDE with
            ``beta_min``/``beta_max``) or ``"discrete"`` (``codebases/latent_diffusion``, ``imagenet256``:
            DPM-Solver's ``t = (n + 1) / N`` on ``alphas_cumprod``, default: the target model's table).
        name: the schedule's label.
        expected_nfe: the NFE the file name states (:func:`usf_nfe_from_filename`); raise if the
            converted schedule's NFE (S³ accounting) differs.
        afs_x0: the data mean in model space, required for ``afs="average_x0"`` (the released
            ``average_x0.pth``).
        clamp_final: if the last target (e.g. EDM's sigma 0.002) is cleaner than the target model's
            cleanest time, land on that time instead of raising (recorded in ``meta``).

    Every step's time is mapped through lambda: ``t_ours = noise_schedule.t_from_lambda(lambda_released(t))``.
    Decisions fastgen cannot reproduce exactly raise a ValueError naming the step: the
    ``dpmsolver_v3`` prediction, orders above 3 or start points below -3, derivative estimates on other
    points or other counts than fastgen's "most recent points" rule, the ``0.5exp``/``-0.5exp``
    relaxations, correctors that do not redo their own step (or that sit on the final step), relaxed
    correctors of order >= 3, an analytical first step whose point later steps reuse, and skip
    coefficients other than all ones. Relaxations on derivatives >= 2 are dropped (the released
    sampler ignores them) and noted in ``meta["usf_source"]["notes"]``.
    """
    _check_convention(time_convention)
    d = _unwrap(decisions)
    notes: list[str] = []

    # ------------------------------------------------------------------ times
    times_t = d["timesteps"]
    released = [float(v) for v in (times_t.reshape(-1).tolist() if isinstance(times_t, torch.Tensor) else list(times_t))]
    n = len(released) - 1
    for key in ("orders", "prediction_types", "start_points", "derivative_types", "corrector_types"):
        if not isinstance(d[key], (list, tuple)) or len(d[key]) != n:
            raise ValueError(f"decisions[{key!r}] must list one entry per step ({n} steps from {n + 1} timesteps), "
                             f"got {d[key]!r}.")
    if n < 1:
        raise ValueError(f"decisions['timesteps'] must hold at least 2 times, got {released}.")
    if any(b >= a for a, b in zip(released, released[1:])):
        raise ValueError(f"decisions['timesteps'] must be strictly decreasing, got {released}.")
    if time_convention == "discrete" and alphas_cumprod is None:
        alphas_cumprod = getattr(noise_schedule, "alphas_cumprod", None)
        if alphas_cumprod is None:
            raise ValueError("time_convention='discrete' needs alphas_cumprod (the released model's table) when the "
                             f"target {noise_schedule!r} has none.")
    conv = {"alphas_cumprod": alphas_cumprod, "beta_min": beta_min, "beta_max": beta_max}
    lams = released_lambda(released, time_convention, **conv)
    ours = noise_schedule.t_from_lambda(lams)
    back = noise_schedule.lambda_(ours)
    final_clamped = False
    for i, (t_rel, lam, lam_back) in enumerate(zip(released, lams.tolist(), back.tolist())):
        if math.isfinite(lam) and abs(lam_back - lam) <= 1e-9 * max(1.0, abs(lam)):
            continue
        if i == n and clamp_final and lam > lam_back:
            final_clamped = True
            notes.append(f"final time {t_rel} (lambda {lam:.6g}) is cleaner than the model's cleanest time; "
                         f"clamped to {float(ours[i])} (lambda {lam_back:.6g})")
            continue
        where = "the final target" if i == n else f"step {i}"
        raise ValueError(f"{where}: released time {t_rel} ({time_convention}, lambda {lam:.6g}) lies outside the "
                         f"target model's lambda range (nearest: {lam_back:.6g}); "
                         + ("pass clamp_final=True to land on the model's cleanest time instead."
                            if i == n else "this schedule does not fit the model."))
    net = [float(v) for v in ours.tolist()]

    # ------------------------------------------------------------------ AFS and skip coefficients
    afs = d.get("afs", "no_afs")
    afs = "no_afs" if afs in (None, "none") else afs
    if afs not in ("no_afs", "zero_x0", "average_x0"):
        raise ValueError(f"decisions['afs'] must be 'no_afs', 'zero_x0' or 'average_x0', got {afs!r}.")
    skip = d.get("skip_coefficients")
    if skip is not None:
        s = torch.as_tensor(skip, dtype=torch.float64)
        if not torch.all(s == 1.0):
            raise ValueError(f"decisions['skip_coefficients'] = {s.tolist()} rescale the U-Net skip connections "
                             "(model surgery); fastgen schedules cannot express this (all ones = unchanged is accepted).")

    # ------------------------------------------------------------------ steps
    steps: list[StepDecision] = []
    n_implicit = 0
    for i in range(n):
        what = f"step {i}"
        pred_name = d["prediction_types"][i]
        if pred_name == "dpmsolver_v3_prediction":
            raise ValueError(f"{what}: prediction 'dpmsolver_v3_prediction' (DPM-Solver-v3's EMS statistics) is not "
                             "supported by fastgen's USF sampler.")
        if pred_name not in _PREDICTIONS:
            raise ValueError(f"{what}: unknown prediction type {pred_name!r} (expected {list(_PREDICTIONS)} or "
                             "'dpmsolver_v3_prediction').")
        pred = _PREDICTIONS[pred_name]
        order = _int(d["orders"][i], f"{what}.order")
        start = _int(d["start_points"][i], f"{what}.start_point")
        n_points = i + 1  # history in the released sampler: t_0 .. t_i (t_0 is the AFS point when afs is on)
        if not 1 <= order <= n_points or not -n_points <= start <= -1:
            raise ValueError(f"{what}: order {order} with start point {start} needs more than the {n_points} "
                             "history points available.")
        if order > MAX_ORDER:
            raise ValueError(f"{what}: Taylor order {order} is above fastgen's maximum {MAX_ORDER}.")
        if start < -MAX_START:
            raise ValueError(f"{what}: start point {start} is below fastgen's minimum -{MAX_START}.")
        pts = _our_points(start, order - 1)
        relax, coef = _derivatives(d["derivative_types"][i], order, start, n_points, pred, pts, what, notes)
        uses_afs_point = afs != "no_afs" and i > 0 and (start == -n_points or -n_points in pts)
        if uses_afs_point:
            raise ValueError(f"{what}: uses the analytical-first-step point t_0 (start point {start}, order {order}); "
                             "fastgen's AFS is a network-free jump whose prediction does not enter the history.")

        c = d["corrector_types"][i]
        ctype = c.get("type") if isinstance(c, Mapping) else c
        if ctype not in _CORRECTORS:
            raise ValueError(f"{what}: corrector type {ctype!r} must be one of {list(_CORRECTORS)}.")
        corrector, c_relax = "none", "none"
        if ctype != "no_corrector":
            if i == n - 1:
                raise ValueError(f"{what}: a {ctype} corrector on the final step (the released sampler evaluates the "
                                 "model at the final time for it) is not representable; fastgen has none there.")
            if i == 0 and afs != "no_afs":
                raise ValueError(f"{what}: a {ctype} corrector of the analytical first step is not representable.")
            if not isinstance(c, Mapping):
                raise ValueError(f"{what}: corrector must be a dict with type/start_point/taylor_order/derivative_type.")
            c_order = _int(c.get("taylor_order"), f"{what}.corrector.taylor_order")
            c_start = _int(c.get("start_point"), f"{what}.corrector.start_point")
            if c_order != order + 1 or c_start != start - 1:
                raise ValueError(f"{what}: corrector (order {c_order}, start point {c_start}) does not redo its step one "
                                 f"order higher from the same point (fastgen: order {order + 1}, start point {start - 1}).")
            c_pts = {-1} | {p - 1 for p in pts}
            if afs != "no_afs" and -(n_points + 1) in c_pts | {c_start}:
                raise ValueError(f"{what}: the corrector uses the analytical-first-step point t_0.")
            c_relax, c_coef = _derivatives(c.get("derivative_type"), c_order, c_start, n_points + 1, pred, c_pts,
                                           f"{what}.corrector", notes)
            if c_relax != "none" and order >= 2:
                raise ValueError(f"{what}: corrector of order {c_order} relaxes its first derivative ({c_relax}); "
                                 "fastgen relaxes correctors only after an order-1 predictor.")
            if c_relax == "linear":
                coef = c_coef  # an order-1 predictor has no derivative: its coefficient slot carries the corrector's
            corrector = ctype
            n_implicit += ctype == "implicit"
        steps.append(StepDecision(pred, order, relax, coef, corrector, c_relax, start))

    first_pred = d["prediction_types"][0]
    our_afs, our_afs_x0 = "none", None
    if afs == "zero_x0":
        if time_convention == "edm_sigma" and first_pred == "noise_prediction":
            # codebases/edm sets eps := x_T / sigma_T, i.e. x0 := 0: fastgen's average_x0 with a zero mean.
            our_afs, our_afs_x0 = "average_x0", 0.0
            notes.append("afs zero_x0 (EDM codebase, noise prediction: eps := x_T / sigma_T, i.e. x0 := 0) "
                         "converted to afs='average_x0' with afs_x0=0.0")
        elif time_convention == "edm_sigma":
            raise ValueError("step 0: afs 'zero_x0' with a data-prediction first step in the EDM codebase sets "
                             "eps := x_T in sigma (VE) scale, which has no parameterisation-free meaning; not representable.")
        else:
            our_afs = "zero_x0"  # eps(x_T) := x_T, as fastgen's zero_x0
    elif afs == "average_x0":
        if afs_x0 is None:
            raise ValueError("decisions use afs 'average_x0': pass afs_x0 (the released average_x0.pth, the data "
                             "mean in model space, as a number or nested list).")
        our_afs = "average_x0"
        our_afs_x0 = afs_x0.tolist() if isinstance(afs_x0, torch.Tensor) else afs_x0

    # ------------------------------------------------------------------ schedule and NFE
    released_nfe = n - (afs != "no_afs") + sum(
        1 for c in d["corrector_types"] if isinstance(c, Mapping) and c.get("type") == "implicit")
    if n_implicit:
        notes.append("implicit correctors re-evaluate the model (+1 NFE each, as the released NFE count and the "
                     "paper); the released sampler's re-evaluation branch compares the corrector dict with a string "
                     "and never runs, so it sampled these as pseudo correctors")
    source = {"format": "thu-nics/USF decisions", "time_convention": time_convention,
              "released_timesteps": released, "released_lambdas": [float(v) for v in lams.tolist()],
              "afs": afs, "orders": _plain(d["orders"]), "prediction_types": _plain(d["prediction_types"]),
              "start_points": _plain(d["start_points"]), "derivative_types": _plain(d["derivative_types"]),
              "corrector_types": _plain(d["corrector_types"]),
              "skip_coefficients": _plain(skip), "nfe": released_nfe, "final_clamped": final_clamped,
              "notes": notes}
    if time_convention == "vp_continuous":
        source.update(beta_min=float(beta_min), beta_max=float(beta_max))
    schedule = SolverSchedule(net[:-1], steps, final_timestep=net[-1], afs=our_afs, afs_x0=our_afs_x0, name=name,
                              meta={"usf_source": source})
    if schedule.nfe != released_nfe:
        raise ValueError(f"converted schedule has NFE {schedule.nfe} but the released decisions count {released_nfe}.")
    if expected_nfe is not None and schedule.nfe != int(expected_nfe):
        raise ValueError(f"the released decisions give NFE {schedule.nfe} (steps {n} - analytical first step "
                         f"{int(afs != 'no_afs')} + implicit correctors {n_implicit}), but {int(expected_nfe)} was "
                         "expected (the file name's NFE).")
    return schedule


__all__ = ["load_usf_decisions", "from_usf_decisions", "usf_nfe_from_filename", "released_lambda",
           "released_time_from_lambda", "TIME_CONVENTIONS"]
