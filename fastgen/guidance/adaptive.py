"""Adaptive Guidance and LinearAG (Castillo et al. 2023, arXiv:2312.12487, AAAI 2025)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import GuiderOutput

from .base import CFGFamilyGuidance, check_choice, check_number

AG_SPACES = ("eps", "x0", "input")
BATCH_RULES = ("sample", "batch")
LINEAR_AG_FORMAT = "fastgen-linear-ag/1"
LINEAR_AG_REGRESSORS = ("eps_cond", "eps_cond_prev", "eps_uncond_prev", "bias")


class AdaptiveGuidance(CFGFamilyGuidance):
    r"""Adaptive Guidance (AG): CFG until cond and uncond predictions align, then conditional only.

    Castillo, Kohler, Pérez, Pérez, Pumarola, Ghanem, Arbeláez & Thabet, "Adaptive Guidance: Training-free
    Acceleration of Conditional Diffusion Models", arXiv:2312.12487 (AAAI 2025). At each CFG step the guider
    computes γ_t = cos(ε_c, ε_u) per sample (flattened). At the first step where γ_t ≥ γ̄ (``threshold``) that step
    still uses CFG (both evaluations are paid for) and every later step is conditional only (1 NFE): the switch is
    monotone, guidance never comes back. A run that trips at step j therefore equals CFG with
    ``stop = (j+1)/N`` and costs ``2k + (N − k)`` evaluations per sample with ``k = j + 1``.

    The combine is diffusers' CFG ``uncond + w (cond − uncond)`` (uncond-anchored), bit for bit, so AG that never
    trips equals :class:`~fastgen.guidance.CFG`.

    **Space.** ``space="eps"`` (the paper) reads the cosine on noise predictions, ``"x0"`` on data predictions
    (as ComfyUI-Adaptive-Guidance does), ``"input"`` on whatever the caller passes. In FastGen pipelines the loop
    supplies x_t and the parameterisation, so "eps"/"x0" are exact whatever ``guidance_space`` is; in diffusers'
    modular pipelines (no such hook) the raw model output is used (ε for SD/SDXL). γ̄ depends on the model and the
    space (on SDXL ε-predictions are so similar that 0.991 trips at once): calibrate it, and read the logged
    ``gamma_history``.

    **Batch semantics.** ``batch_rule="sample"`` (default, the paper's per-image rule): each sample truncates on
    its own; the FastGen loop then runs the unconditional branch only for the samples still guided, so a sample's
    result and its NFE do not depend on its batch-mates (``truncation_step`` and the loop's per-sample NFE give the
    exact counts). Where the caller cannot split a batch (diffusers' modular pipelines) the outputs follow the same
    per-sample rule but the unconditional pass is skipped only once every sample has truncated.
    ``batch_rule="batch"``: the whole batch truncates at the first step where every sample has passed γ̄.

    Args:
        guidance_scale: w (CFG's meaning).
        threshold: γ̄ (paper: 0.991 on ε); > 1 never trips.
        space: ``"eps"``, ``"x0"`` or ``"input"`` (where γ is measured).
        batch_rule: ``"sample"`` or ``"batch"``.
        guidance_rescale, start, stop, enabled: as in diffusers' ``ClassifierFreeGuidance``.
    """

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.5,
        threshold: float = 0.991,
        space: str = "eps",
        batch_rule: str = "sample",
        guidance_rescale: float = 0.0,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
    ):
        check_number("threshold", threshold, low=-1.0)
        check_choice("space", space, AG_SPACES)
        check_choice("batch_rule", batch_rule, BATCH_RULES)
        check_number("guidance_rescale", guidance_rescale, low=0.0, high=1.0)
        self.threshold, self.space, self.batch_rule = float(threshold), space, batch_rule
        self.guidance_rescale = float(guidance_rescale)
        super().__init__(guidance_scale, start, stop, enabled)

    # ------------------------------------------------------------------ state
    def reset_run_state(self) -> None:
        super().reset_run_state()
        self.passed: torch.Tensor | None = None          # per sample: γ ≥ γ̄ seen (sticky)
        self.truncated_at: torch.Tensor | None = None    # per sample: first conditional-only step, -1 = never
        self.gamma_history: dict[int, torch.Tensor] = {}  # step -> γ per sample (NaN where not measured)

    def _truncated(self) -> torch.Tensor | None:
        """Samples that run conditional only from now on (the batch rule applied to ``passed``)."""
        if self.passed is None:
            return None
        if self.batch_rule == "batch":
            return self.passed.clone().fill_(bool(self.passed.all()))
        return self.passed

    @property
    def truncation_step(self) -> list[int | None]:
        """Per sample, the first conditional-only step of the last run (``None``: never truncated)."""
        if self.truncated_at is None:
            return []
        return [None if s < 0 else int(s) for s in self.truncated_at.tolist()]

    def _all_truncated(self) -> bool:
        truncated = self._truncated()
        return truncated is not None and bool(truncated.all())

    @property
    def num_conditions(self) -> int:
        return 2 if self._guidance_active() and not self._all_truncated() else 1

    def uncond_rows(self) -> torch.Tensor | None:
        truncated = self._truncated()
        if truncated is None or not truncated.any():
            return None
        return ~truncated

    # ------------------------------------------------------------------ maths
    def _in_space(self, pred: torch.Tensor, space: str | None = None) -> torch.Tensor:
        space = space or self.space
        if self.context is None or space == "input":
            return pred
        return self.context.to_eps(pred) if space == "eps" else self.context.to_x0(pred)

    @staticmethod
    def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-sample cosine similarity of flattened tensors, in float64."""
        a, b = a.flatten(1).double(), b.flatten(1).double()
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)

    def _cfg(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor) -> torch.Tensor:
        shift = pred_cond - pred_uncond
        return pred_uncond + self.guidance_scale * shift  # diffusers' CFG, same operations

    def _checks_truncation(self) -> bool:
        return True

    def combines_linearly(self) -> bool:
        """CFG or the conditional prediction per row (LinearAG: CFG with an affine estimate of the unconditional
        branch): linear unless rescaled. Similarities are read through the context in ``space`` either way."""
        return not getattr(self, "guidance_rescale", 0.0) > 0.0

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None) -> GuiderOutput:
        if pred_uncond is None or not self._guidance_active():
            return GuiderOutput(pred=self._rescale(pred_cond, pred_cond), pred_cond=pred_cond, pred_uncond=pred_uncond)
        batch = pred_cond.shape[0]
        if self.passed is None or self.passed.shape[0] != batch:
            self.passed = torch.zeros(batch, dtype=torch.bool, device=pred_cond.device)
            self.truncated_at = torch.full((batch,), -1, dtype=torch.long, device=pred_cond.device)
        truncated = self._truncated()
        pred = self._cfg(pred_cond, pred_uncond)
        if truncated.any():
            pred = torch.where(truncated.view(-1, *[1] * (pred.ndim - 1)), pred_cond, pred)
        if self._checks_truncation():
            self._update_truncation(pred_cond, pred_uncond, truncated)
        return GuiderOutput(pred=self._rescale(pred, pred_cond), pred_cond=pred_cond, pred_uncond=pred_uncond)

    def _update_truncation(self, pred_cond, pred_uncond, truncated) -> None:
        gamma = self.cosine(self._in_space(pred_cond), self._in_space(pred_uncond))
        gamma = torch.where(truncated, torch.full_like(gamma, float("nan")), gamma)
        self.gamma_history[int(self._step or 0)] = gamma.cpu()
        newly = (gamma >= self.threshold) & ~self.passed
        self.passed = self.passed | newly
        after = self._truncated()
        first = after & (self.truncated_at < 0)
        self.truncated_at[first] = int(self._step or 0) + 1

    def step_record(self) -> dict[str, Any]:
        """What the FastGen loop logs for this step: mean/min γ of the samples still guided."""
        gamma = self.gamma_history.get(int(self._step or 0))
        if gamma is None or torch.isnan(gamma).all():
            return {}
        valid = gamma[~torch.isnan(gamma)]
        return {"gamma_mean": float(valid.mean()), "gamma_min": float(valid.min())}


class LinearAG(AdaptiveGuidance):
    r"""LinearAG: early unconditional passes replaced by a fitted affine prediction, AG truncation later.

    Castillo et al., "Adaptive Guidance: Training-free Acceleration of Conditional Diffusion Models",
    arXiv:2312.12487, LinearAG section. In the first part of sampling (the steps listed in the fitted file,
    by default steps 1 … N/2 − 1) the unconditional noise prediction is not evaluated but estimated as

        ε̂_u(i) = c0·ε_c(i) + c1·ε_c(i−1) + c2·ε̂_u(i−1) + c3

    with per-step scalar coefficients fitted by least squares on calibration CFG trajectories
    (:func:`fit_linear_ag_coefficients`, ``fastgen fit-linear-ag``); then CFG combines ε_c with ε̂_u. The
    regressors are the current conditional prediction and the previous step's (possibly estimated) pair; the
    exact regressor set of the paper could not be checked here (see the report). Step 0, and the first step of
    a run that starts mid-schedule, evaluate both branches to seed the history. After the replaced steps the
    :class:`AdaptiveGuidance` rule applies (γ̄ on ``space``). Per sample NFE = 2·(#CFG steps) + (#LinearAG
    steps) + (#conditional-only steps).

    The coefficients are tied to (scheduler, N, guidance scale): they are stored with that metadata and a run
    with another N, scale or scheduler is refused.

    Args:
        guidance_scale: w; ``None`` takes the fitted file's scale (a different value is refused).
        coefficients: path to a fitted JSON file, or its content as a dict. ``None``: the FastGen loop looks for
            ``<model folder>/linear_ag/<Scheduler>_steps<N>_scale<w>.json`` (what ``fastgen fit-linear-ag`` writes).
        threshold, space, batch_rule, guidance_rescale, start, stop, enabled: as in :class:`AdaptiveGuidance`.
    """

    @register_to_config
    def __init__(
        self,
        guidance_scale: float | None = None,
        coefficients: str | dict | None = None,
        threshold: float = 0.991,
        space: str = "eps",
        batch_rule: str = "sample",
        guidance_rescale: float = 0.0,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
    ):
        if not isinstance(coefficients, (str, os.PathLike, dict, type(None))):
            raise ValueError(f"coefficients must be a path, a dict or None, got {type(coefficients).__name__}.")
        self.fit: dict | None = None
        if coefficients is not None:
            self.fit = load_linear_ag_coefficients(coefficients)
            if guidance_scale is None:
                guidance_scale = self.fit["guidance_scale"]
            elif not math.isclose(float(guidance_scale), self.fit["guidance_scale"]):
                raise ValueError(f"guidance_scale {guidance_scale} does not match the LinearAG coefficients, fitted at "
                                 f"scale {self.fit['guidance_scale']}; refit with fastgen fit-linear-ag --scale.")
        super().__init__(7.5 if guidance_scale is None else guidance_scale, threshold, space, batch_rule,
                         guidance_rescale, start, stop, enabled)

    def reset_run_state(self) -> None:
        super().reset_run_state()
        self.history: tuple[torch.Tensor, torch.Tensor] | None = None  # (ε_c, ε_u) of the previous step
        self._history_step: int | None = None

    def prepare_call(self, *, model_path=None, scheduler=None, num_inference_steps: int | None = None) -> None:
        """Find the fitted coefficients next to the model (when none were given) and check them, before any
        model work; the sampling loop itself never reads files."""
        if self.fit is None and num_inference_steps is not None:
            self._find_fit(model_path, scheduler, num_inference_steps)
        if self.fit is not None and num_inference_steps is not None:
            self._check_fit(num_inference_steps, scheduler)

    def begin_run(self, num_inference_steps: int, start_step: int = 0, batch_size: int | None = None,
                  scheduler=None) -> None:
        if self.fit is None:
            raise ValueError("guidance 'linear-ag' has no fitted coefficients: pass LinearAG(coefficients=path) or run "
                             "it through a FastGen pipeline, which finds them next to the model.")
        self._check_fit(num_inference_steps, scheduler)
        super().begin_run(num_inference_steps, start_step, batch_size, scheduler)

    def _find_fit(self, model_path, scheduler, num_steps) -> None:
        name = type(scheduler).__name__ if scheduler is not None else "<scheduler>"
        candidate = default_coefficients_path(model_path, name, num_steps, self.guidance_scale) if model_path else None
        if candidate is None or not candidate.is_file():
            raise ValueError(
                f"guidance 'linear-ag' needs fitted coefficients for {name}, {num_steps} steps, scale "
                f"{self.guidance_scale:g}: none at {candidate}; run `fastgen fit-linear-ag --model <model> --steps "
                f"{num_steps} --scale {self.guidance_scale:g}` or pass LinearAG(coefficients=path).")
        self.fit = load_linear_ag_coefficients(str(candidate))

    def _check_fit(self, num_steps: int, scheduler) -> None:
        fit = self.fit
        if fit["num_inference_steps"] != num_steps:
            raise ValueError(f"num_inference_steps {num_steps} does not match the LinearAG coefficients, fitted for "
                             f"{fit['num_inference_steps']} steps; refit with fastgen fit-linear-ag --steps.")
        if not math.isclose(self.guidance_scale, fit["guidance_scale"]):
            raise ValueError(f"guidance_scale {self.guidance_scale} does not match the LinearAG coefficients, fitted "
                             f"at scale {fit['guidance_scale']}.")
        if scheduler is not None and fit.get("scheduler") and type(scheduler).__name__ != fit["scheduler"]:
            raise ValueError(f"solver {type(scheduler).__name__} does not match the LinearAG coefficients, fitted with "
                             f"{fit['scheduler']}; refit with fastgen fit-linear-ag --solver.")

    def set_state(self, step: int, num_inference_steps: int, timestep) -> None:
        super().set_state(step, num_inference_steps, timestep)
        if self.fit is not None and self._step == 0 and num_inference_steps != self.fit["num_inference_steps"]:
            self._check_fit(num_inference_steps, None)

    # ------------------------------------------------------------------ schedule
    def _replaced(self) -> bool:
        """Is this step a LinearAG step (fitted coefficients and the previous step's history available)?"""
        return (self.fit is not None and self._guidance_active() and self._step in self.fit["steps"]
                and self.history is not None and self._history_step == self._step - 1)

    def _checks_truncation(self) -> bool:
        last = max(self.fit["steps"]) if self.fit and self.fit["steps"] else -1
        return int(self._step or 0) > last

    @property
    def num_conditions(self) -> int:
        if self._replaced():
            return 1
        return super().num_conditions

    def uncond_rows(self) -> torch.Tensor | None:
        return None if self._replaced() else super().uncond_rows()

    @property
    def wants_conditional_forward(self) -> bool:
        return self._replaced()

    # ------------------------------------------------------------------ maths
    def _to_eps(self, pred):
        return pred if self.context is None else self.context.to_eps(pred)

    def _from_eps(self, eps):
        return eps if self.context is None else self.context.from_eps(eps)

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None) -> GuiderOutput:
        if pred_uncond is None and self._replaced():
            c0, c1, c2, c3 = self.fit["steps"][self._step]
            eps_c = self._to_eps(pred_cond)
            eps_c_prev, eps_u_prev = self.history
            eps_u = c0 * eps_c + c1 * eps_c_prev + c2 * eps_u_prev + c3
            self.history, self._history_step = (eps_c, eps_u), self._step
            pred_uncond = self._from_eps(eps_u)
            pred = self._cfg(pred_cond, pred_uncond)
            return GuiderOutput(pred=self._rescale(pred, pred_cond), pred_cond=pred_cond, pred_uncond=pred_uncond)
        if pred_uncond is not None and self._guidance_active():
            self.history, self._history_step = (self._to_eps(pred_cond), self._to_eps(pred_uncond)), self._step
        return super().forward(pred_cond, pred_uncond)


# ---------------------------------------------------------------------------------------------- coefficients
def default_coefficients_path(model_path, scheduler_name: str, num_steps: int, guidance_scale: float) -> Path:
    """Where ``fastgen fit-linear-ag`` writes coefficients by default: next to the model."""
    return Path(model_path) / "linear_ag" / f"{scheduler_name}_steps{num_steps}_scale{guidance_scale:g}.json"


def load_linear_ag_coefficients(source: str | dict) -> dict:
    """Read and validate a LinearAG coefficients file (or its content); step keys become ints."""
    where = "coefficients"
    if isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        where = f"coefficients file {str(path)!r}"
        if not path.is_file():
            raise FileNotFoundError(f"coefficients file {str(path)!r} does not exist; write one with fastgen fit-linear-ag.")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{where} is not valid JSON: {err}.") from None
    if not isinstance(data, dict) or data.get("format") != LINEAR_AG_FORMAT:
        raise ValueError(f"{where} must be a {LINEAR_AG_FORMAT!r} file written by fastgen fit-linear-ag.")
    try:
        steps = {int(k): [float(c) for c in v] for k, v in data["steps"].items()}
        out = dict(data, steps=steps, num_inference_steps=int(data["num_inference_steps"]),
                   guidance_scale=float(data["guidance_scale"]))
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{where} is missing or has a malformed field ({err}).") from None
    if any(len(c) != len(LINEAR_AG_REGRESSORS) for c in steps.values()) or any(
            not 1 <= s < out["num_inference_steps"] for s in steps):
        raise ValueError(f"{where}: steps must map step indices in [1, N) to {len(LINEAR_AG_REGRESSORS)} numbers "
                         f"({', '.join(LINEAR_AG_REGRESSORS)}).")
    return out


def least_squares(target: torch.Tensor, regressors: list[torch.Tensor]) -> tuple[list[float], float]:
    """Scalar coefficients c minimising ‖target − Σ c_k regressor_k‖² over all elements, and the fit's R²."""
    X = torch.stack([r.reshape(-1).double() for r in regressors], dim=1)
    y = target.reshape(-1).double()
    coef = torch.linalg.lstsq(X, y[:, None], driver="gelsd").solution[:, 0]
    return coef.tolist(), r_squared(y, X @ coef)


def r_squared(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    y, y_hat = y.reshape(-1).double(), y_hat.reshape(-1).double()
    ss_tot = ((y - y.mean()) ** 2).sum()
    return float(1 - ((y - y_hat) ** 2).sum() / ss_tot.clamp_min(1e-300))


def fit_linear_ag_coefficients(eps_cond: list[torch.Tensor], eps_uncond: list[torch.Tensor], replace_steps,
                               holdout: float = 0.2) -> tuple[dict[int, list[float]], dict[int, float], dict[int, float]]:
    """Fit LinearAG's per-step coefficients on recorded CFG trajectories.

    ``eps_cond[i]``, ``eps_uncond[i]``: noise predictions of all calibration samples at step i (CFG run). Steps
    are fitted in order and each step's regressors use the *estimated* ε̂_u of the previous replaced step, as
    at sampling time, so errors that compound are what is minimised. The last ``holdout`` share of the
    samples is held out. Returns (coefficients, R² on the fit samples, R² on the held-out samples).
    """
    batch = eps_cond[0].shape[0]
    n_fit = max(1, batch - int(round(holdout * batch))) if batch > 1 else 1
    coefs, r2_fit, r2_held = {}, {}, {}
    prev_u = eps_uncond[0]
    for step in range(1, max(replace_steps) + 1):
        regs = [eps_cond[step], eps_cond[step - 1], prev_u, torch.ones_like(eps_cond[step])]
        if step in replace_steps:
            c, r2 = least_squares(eps_uncond[step][:n_fit], [r[:n_fit] for r in regs])
            coefs[step], r2_fit[step] = c, r2
            prev_u = sum(ci * r for ci, r in zip(c, regs))
            if n_fit < batch:
                r2_held[step] = r_squared(eps_uncond[step][n_fit:], prev_u[n_fit:])
        else:
            prev_u = eps_uncond[step]
    return coefs, r2_fit, r2_held
