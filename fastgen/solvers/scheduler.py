"""USFScheduler: a diffusers scheduler that runs a USF :class:`~fastgen.solvers.usf.SolverSchedule`.

It follows the diffusers scheduler protocol (``set_timesteps``, ``scale_model_input``, ``step``,
``set_begin_index``, ``add_noise``), so it works inside any stock diffusers pipeline and inside
fastgen's own sampling loop::

    pipe.scheduler = USFScheduler.from_config(pipe.scheduler.config, preset="usf-dpmsolver++-2m")
    pipe.scheduler = USFScheduler.from_config(pipe.scheduler.config, schedule="nfe5.json")

The schedule is stored in ``scheduler_config.json``, so ``save_pretrained``/``from_pretrained`` keep it.

VP (DDPM-beta) models and flow-matching (rectified-flow, velocity-predicting) models are supported; for the
latter, pass the model's FlowMatchEuler config (SD3, Flux)::

    pipe.scheduler = USFScheduler.from_config(pipe.scheduler.config, preset="usf-unipc-bh2-2p")

and the scheduler accepts ``set_timesteps(n, sigmas=..., mu=...)`` as stock flow pipelines call it, building
the flow grid of the preset's diffusers solver (DPM-Solver++ / UniPC with ``use_flow_sigmas=True``).
EDM / VE-form (``EDM*``) schedulers are not supported.
Method: Liu et al. 2024, *A Unified Sampling Framework for Solver Searching of Diffusion Probabilistic
Models* (S³, arXiv:2312.07243); see :mod:`fastgen.solvers.usf` for the update rule.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
# Imported by name and subclassed directly: diffusers' loader looks these names up in this module.
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput

from ..parameterization import Parameterization
from ..schedule import NoiseSchedule
from .usf import (SolverSchedule, check_flow_preset, check_preset, flow_reference_config, is_flow_config,
                  preset_schedule, taylor_coefficients)

_DATA = Parameterization("sample")
_BASE_KEYS = ("timestep_spacing", "steps_offset", "final_sigmas_type", "lower_order_final", "euler_at_final",
              "clip_sample", "clip_sample_range", "set_alpha_to_one")
_FLOW_KEYS = ("use_flow_sigmas", "flow_shift", "use_dynamic_shifting", "time_shift_type", "shift_terminal",
              "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")
# FlowMatchEulerDiscreteScheduler's defaults for the keys stock pipelines read to compute ``mu``.
_FLOW_DEFAULTS = {"flow_shift": 1.0, "use_dynamic_shifting": False, "time_shift_type": "exponential",
                  "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}


@dataclass
class USFSchedulerOutput(BaseOutput):
    """``prev_sample``: the sample at the step's target; ``pred_original_sample``: the x0 prediction."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


@dataclass
class _Point:
    """One evaluation in the history: its time, lambda, predictions, and the sample it was taken at."""

    t: float
    lam: float
    x0: torch.Tensor
    eps: torch.Tensor
    eps_raw: torch.Tensor
    x: torch.Tensor


@dataclass
class _Pending:
    """A step waiting for its corrector: what it expanded around and where it started."""

    step: int
    order: int
    x_start: torch.Tensor
    base: _Point
    others: list


class USFScheduler(SchedulerMixin, ConfigMixin):
    """Unified-sampling-framework solver (S³, Liu et al. 2024) as a diffusers scheduler.

    Two model families are supported:

    * **VP (DDPM-beta) models**, from any DDPM/DDIM/DPM-Solver/UniPC/DEIS/Euler... config with betas: every
      preset reproduces its diffusers solver.
    * **Flow-matching (rectified-flow) models**: ``x_t = (1 - s) x0 + s eps``, network timestep ``s * T``,
      output the velocity ``v = eps - x0`` (``prediction_type="flow_prediction"``), as SD3 / Flux. Flow
      mode is detected by ``from_config`` from a ``FlowMatch*`` config (its ``shift`` becomes
      ``flow_shift``) or from ``use_flow_sigmas=True`` / ``prediction_type="flow_prediction"``; it is kept
      in the registered config (``use_flow_sigmas=True``), so ``save_pretrained``/``from_pretrained``
      round-trip. The update is the same exponential integrator with ``alpha = 1 - s``, ``sigma = s``,
      ``x0 = x - s v`` and ``eps = x + (1 - s) v``. ``set_timesteps(n, sigmas=..., mu=...)`` builds the grid
      the preset's diffusers solver builds in flow mode (DPM-Solver++ / UniPC with ``use_flow_sigmas``:
      shift, dynamic shift ``mu``, ``shift_terminal``), and the network gets the same truncated integer
      timesteps they give it. Flow presets: :data:`fastgen.solvers.usf.FLOW_PRESETS` (DPM-Solver++ 2M,
      UniPC, ``usf-default``); DDIM, DEIS and noise-prediction DPM-Solver have no flow mode and raise.

    Not supported: EDM / VE-form schedulers (``EDMEulerScheduler``, ``EDMDPMSolverMultistepScheduler``)
    and Karras / exponential / beta sigma grids in flow mode (these raise); a VP config's
    ``use_karras_sigmas`` is ignored.

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the model's VP training
            schedule (as in diffusers' DDPM/DPM-Solver configs); for flow models ``num_train_timesteps``
            is the timestep scale ``T``.
        prediction_type: the network's output (``"epsilon"``, ``"v_prediction"``, ``"sample"``, or
            ``"flow_prediction"`` for flow-matching models).
        thresholding, dynamic_thresholding_ratio, sample_max_value: dynamic thresholding of x0
            (Saharia et al. 2022), as in diffusers' multistep schedulers.
        preset: a preset name (:func:`fastgen.solvers.available_presets`), expanded for the number of
            steps of each call; used when ``schedule`` is ``None``.
        schedule: a fixed :class:`SolverSchedule` (its dict form, the object, or a path to its JSON).
        timestep_spacing, steps_offset, final_sigmas_type, lower_order_final, euler_at_final, clip_sample,
            clip_sample_range, set_alpha_to_one: base-config values forwarded to the diffusers solver a
            preset reproduces (``None`` = that solver's default).
        use_flow_sigmas: flow-matching mode (set by ``from_config`` for flow configs; ``None`` = VP).
        flow_shift, use_dynamic_shifting, time_shift_type, shift_terminal: the flow grid's shift (as
            DPM-Solver/UniPC's flow mode; FlowMatchEuler's ``shift``), dynamic shifting (``mu``) and
            terminal stretch.
        base_shift, max_shift, base_image_seq_len, max_image_seq_len: kept for stock flow pipelines, which
            read them to compute ``mu`` when ``use_dynamic_shifting`` is on.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers] + ["FlowMatchEulerDiscreteScheduler"]
    order = 1

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """As diffusers' ``from_config``; a flow-matching config (``FlowMatch*``, or a solver config with
        ``use_flow_sigmas=True`` / ``prediction_type="flow_prediction"``) turns on flow mode, with
        FlowMatchEuler's ``shift`` as ``flow_shift``."""
        if isinstance(config, ConfigMixin):
            config = config.config
        if isinstance(config, dict) and is_flow_config({**config, **kwargs}):
            cfg = dict(config)
            flow_reference_config({**cfg, **kwargs})  # raises for Karras/exponential/beta/inverted sigmas
            shift = cfg.pop("shift", None)
            if shift is not None and "flow_shift" not in cfg:
                cfg["flow_shift"] = shift
            for key in ("invert_sigmas", "stochastic_sampling", "use_karras_sigmas", "use_exponential_sigmas",
                        "use_beta_sigmas"):
                cfg.pop(key, None)  # all False here (checked above)
            cfg["use_flow_sigmas"] = True
            cfg["prediction_type"] = "flow_prediction"
            config = cfg
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        preset: str = "usf-default",
        schedule: dict | str | None = None,
        timestep_spacing: str | None = None,
        steps_offset: int | None = None,
        final_sigmas_type: str | None = None,
        lower_order_final: bool | None = None,
        euler_at_final: bool | None = None,
        clip_sample: bool | None = None,
        clip_sample_range: float | None = None,
        set_alpha_to_one: bool | None = None,
        use_flow_sigmas: bool | None = None,
        flow_shift: float | None = None,
        use_dynamic_shifting: bool | None = None,
        time_shift_type: str | None = None,
        shift_terminal: float | None = None,
        base_shift: float | None = None,
        max_shift: float | None = None,
        base_image_seq_len: int | None = None,
        max_image_seq_len: int | None = None,
    ):
        self.is_flow = bool(use_flow_sigmas) or prediction_type == "flow_prediction"
        if self.is_flow:
            if prediction_type != "flow_prediction":
                raise ValueError("use_flow_sigmas=True (a flow-matching model) needs prediction_type='flow_prediction' "
                                 f"(the network predicts the velocity eps - x0), got {prediction_type!r}.")
            given = {"flow_shift": flow_shift, "use_dynamic_shifting": use_dynamic_shifting,
                     "time_shift_type": time_shift_type, "base_shift": base_shift, "max_shift": max_shift,
                     "base_image_seq_len": base_image_seq_len, "max_image_seq_len": max_image_seq_len}
            self.register_to_config(use_flow_sigmas=True, **{k: _FLOW_DEFAULTS[k] if v is None else v
                                                             for k, v in given.items()})
        elif prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type must be one of 'epsilon', 'v_prediction', 'sample', 'flow_prediction', "
                             f"got {prediction_type!r}.")
        if schedule is not None:
            fixed = _load_schedule(schedule)
            self.register_to_config(schedule=fixed.to_dict())
            self._fixed: SolverSchedule | None = fixed
        else:
            check_flow_preset(preset) if self.is_flow else check_preset(preset)
            self._fixed = None
        if self.is_flow:
            flow_reference_config(self.base_config())  # clear errors for unsupported flow options, now
            self.noise_schedule = NoiseSchedule("flow", num_train_timesteps=num_train_timesteps)
        else:
            self.noise_schedule = NoiseSchedule.from_scheduler_config(
                {"num_train_timesteps": num_train_timesteps, "beta_start": beta_start, "beta_end": beta_end,
                 "beta_schedule": beta_schedule, "trained_betas": trained_betas})
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.zeros(0)
        self._times: list[float] = []
        self.schedule: SolverSchedule | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._reset_state()

    # ------------------------------------------------------------------ protocol: state
    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at evaluation ``begin_index`` (img2img strength, teleportation); history starts empty."""
        if begin_index and self.schedule is not None and self.schedule.afs != "none":
            raise ValueError("set_begin_index > 0 (teleport/img2img) cannot follow a schedule with an analytical "
                             "first step; use a schedule with afs='none'.")
        if begin_index and self.schedule is not None and self._plan[begin_index][1] != "main":
            raise ValueError(f"set_begin_index({begin_index}) falls on an implicit-corrector evaluation; start at a step.")
        self._begin_index = begin_index

    def _reset_state(self) -> None:
        self._history: list[_Point] = []
        self._pending: _Pending | None = None
        self._afs_done = False

    def base_config(self) -> dict[str, Any]:
        """The config the reproduced diffusers solvers are built from (``None`` entries = their defaults)."""
        cfg = {k: v for k, v in dict(self.config).items() if not k.startswith("_")}
        cfg.pop("preset", None)
        cfg.pop("schedule", None)
        for key in _BASE_KEYS + _FLOW_KEYS:
            if cfg.get(key) is None:
                cfg.pop(key, None)
        if not cfg.get("use_flow_sigmas"):  # VP: the base config is exactly what it was before flow support
            for key in _FLOW_KEYS:
                cfg.pop(key, None)
        return cfg

    # ------------------------------------------------------------------ protocol: timesteps
    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list[float] | None = None, sigmas: list[float] | None = None,
                      mu: float | None = None) -> None:
        """Build the schedule for this call (a preset expanded for ``num_inference_steps``, or the fixed one).

        A fixed schedule runs its own grid; ``num_inference_steps`` must then equal its NFE (or its number
        of steps). Custom ``timesteps`` replace a preset's grid (last target: clean data).
        Flow-matching mode only: ``sigmas`` (custom sigmas, shifted as diffusers' flow UniPC shifts them) and
        ``mu`` (the dynamic shift stock flow pipelines compute from the image size) go to the preset's grid,
        as ``retrieve_timesteps`` passes them; a fixed schedule keeps its own grid and ignores ``mu``.
        """
        if not self.is_flow and (sigmas is not None or mu is not None):
            raise ValueError("sigmas and mu are only supported in flow-matching mode (a FlowMatch config, or "
                             "use_flow_sigmas=True with prediction_type='flow_prediction').")
        if timesteps is not None and sigmas is not None:
            raise ValueError("pass only one of timesteps and sigmas.")
        if self._fixed is not None:
            schedule = self._fixed
            if timesteps is not None or sigmas is not None:
                raise ValueError("timesteps/sigmas cannot be given with a fixed schedule; it carries its own grid.")
            if num_inference_steps is not None and num_inference_steps not in (schedule.nfe, schedule.num_steps,
                                                                               schedule.num_evals):
                raise ValueError(f"num_inference_steps must match the schedule's NFE ({schedule.nfe}); got "
                                 f"{num_inference_steps}. Search or load a schedule for that NFE instead.")
        elif timesteps is not None:
            times = [float(t) for t in timesteps]
            schedule = preset_schedule(self.config.preset, len(times), self.base_config())
            schedule = SolverSchedule(times, schedule.steps, final_timestep=None, afs=schedule.afs,
                                      afs_x0=schedule.afs_x0, clip_denoised=schedule.clip_denoised, name=schedule.name)
        elif self.is_flow:
            if sigmas is None and (num_inference_steps is None or isinstance(num_inference_steps, bool)
                                   or int(num_inference_steps) < 1):
                raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}.")
            custom = None if sigmas is None else [float(v) for v in sigmas]
            schedule = preset_schedule(self.config.preset, None if custom is not None else int(num_inference_steps),
                                       self.base_config(), sigmas=custom, mu=None if mu is None else float(mu))
        else:
            if num_inference_steps is None or isinstance(num_inference_steps, bool) or int(num_inference_steps) < 1:
                raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}.")
            schedule = preset_schedule(self.config.preset, int(num_inference_steps), self.base_config())
        self.schedule = schedule
        self._afs = int(schedule.afs != "none")
        self._plan = schedule.eval_plan()
        evals = [schedule.timesteps[i] if kind == "main" else schedule.target(i) for i, kind in self._plan]
        shown = self._network_timesteps(schedule, evals) if self.is_flow else evals
        integral = all(float(t).is_integer() for t in shown)
        self.timesteps = torch.tensor(shown, dtype=torch.int64 if integral else torch.float32, device=device)
        # The update works at the exact times; VP keeps reading them back from ``timesteps`` as it always has.
        self._times = [float(t) for t in evals] if self.is_flow else [float(t) for t in self.timesteps]
        if self.is_flow:
            T = float(self.config.num_train_timesteps)
            final = schedule.target(self._plan[-1][0])
            self.sigmas = torch.tensor([t / T for t in self._times] + [0.0 if final is None else final / T],
                                       dtype=torch.float32)
        self.num_inference_steps = len(evals)
        self._step_index = None
        self._begin_index = None
        self._reset_state()

    @staticmethod
    def _network_timesteps(schedule: SolverSchedule, evals: list[float]) -> list[float]:
        """What the network is given at each evaluation: diffusers' flow-mode solvers pass ``int64(sigma *
        T)`` while stepping with the exact sigma; a preset records those in ``meta["network_timesteps"]``.
        Entries more than 1 away from the solver time (a stale list on an edited schedule) are not used."""
        given = schedule.meta.get("network_timesteps")
        if not isinstance(given, list) or len(given) != schedule.num_steps:
            return list(evals)
        out = []
        for (i, kind), t in zip(schedule.eval_plan(), evals):
            g = float(given[i]) if kind == "main" else None
            out.append(g if g is not None and abs(g - t) < 1.0 else t)
        return out

    def _ab(self, t: float | None) -> tuple[float, float, float]:
        """(alpha, sigma, lambda) in float64 at network time ``t`` (``None`` = clean data)."""
        if t is None:
            return 1.0, 0.0, float("inf")
        a, s = self.noise_schedule.alpha_sigma(torch.tensor(float(t), dtype=torch.float64))
        lam = self.noise_schedule.lambda_(torch.tensor(float(t), dtype=torch.float64))
        return float(a), float(s), float(lam)

    def index_for_timestep(self, timestep) -> int:
        matches = (self.timesteps.double() == float(timestep)).nonzero()
        if len(matches) == 0:
            raise ValueError(f"timestep {float(timestep)} is not in this scheduler's timesteps {self.timesteps.tolist()}.")
        return int(matches[0])

    def _init_step_index(self, timestep) -> None:
        self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index

    # ------------------------------------------------------------------ protocol: model input
    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """VP samples are the model input; with an analytical first step, the very first call returns the
        sample after that (network-free) step, which is where the first evaluation happens."""
        if self._afs and not self._afs_done and (self._step_index in (None, 0)) and not self._begin_index:
            return self._afs_jump(sample)
        return sample

    def _afs_jump(self, x: torch.Tensor) -> torch.Tensor:
        """S³'s analytical first step, a DDIM step from t_0 without the network: ``zero_x0`` takes
        eps(x_T) := x_T, ``average_x0`` takes x0 := the data mean ``afs_x0``."""
        a0, s0, l0 = self._ab(self.schedule.timesteps[0])
        a1, s1, l1 = self._ab(self.schedule.timesteps[1])
        if self.schedule.afs == "zero_x0":
            c_x, (c_eps,) = taylor_coefficients("noise", 1, l0, l1, a0, s0, a1, s1, [])
            return (c_x + c_eps) * x
        c_x, (c_x0,) = taylor_coefficients("data", 1, l0, l1, a0, s0, a1, s1, [])
        mean = torch.as_tensor(self.schedule.afs_x0, dtype=x.dtype, device=x.device)
        return c_x * x + c_x0 * mean

    # ------------------------------------------------------------------ protocol: step
    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """Advance ``sample`` from ``timestep`` to the step's target (UniC-style correction of the previous
        step first, when that step asked for a pseudo corrector). At an implicit-corrector evaluation the
        returned sample is the corrected end point of the previous step, at the same time."""
        if self.schedule is None:
            raise ValueError("call set_timesteps before step.")
        if self._step_index is None:
            self._init_step_index(timestep)
        if self._step_index >= self.num_inference_steps:
            raise ValueError(f"step called {self._step_index + 1} times for {self.num_inference_steps} timesteps.")
        i, kind = self._plan[self._step_index]
        if self._afs and not self._afs_done and self._step_index == 0:
            sample = self._afs_jump(sample)
        self._afs_done = True
        point = self._convert(model_output, sample, self._times[self._step_index])
        if kind == "implicit":  # correct step i with this evaluation; the next call re-evaluates there
            prev = self._correct(point)
        else:
            if self._pending is not None:
                sample = self._correct(point)
                point.x = sample
            self._history = (self._history + [point])[-6:]
            prev = self._predict(i, sample)
        self._step_index += 1
        if not return_dict:
            return (prev, point.x0)
        return USFSchedulerOutput(prev_sample=prev, pred_original_sample=point.x0)

    def _convert(self, out: torch.Tensor, x: torch.Tensor, t: float) -> _Point:
        """x0 and eps from the raw output at network time ``t`` (x0 thresholded/clipped, eps consistent)."""
        a, s, lam = self._ab(t)
        x0, eps = Parameterization(self.config.prediction_type).to_x0_eps(out, x, a, s)
        eps_raw = eps
        clip = self.schedule.clip_denoised
        if self.config.thresholding or clip is not None:
            if self.config.thresholding:
                x0 = _threshold(x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
            else:
                x0 = x0.clamp(-float(clip), float(clip))
            eps = _DATA.to_x0_eps(x0, x, a, s)[1]  # the noise consistent with the clipped x0
        return _Point(t, lam, x0, eps, eps_raw, x)

    def _update(self, decision, order: int, x: torch.Tensor, t_from: float, t_to: float | None,
                base: _Point, others: list[_Point], relaxation: str) -> torch.Tensor:
        """One exponential-integrator update of ``x`` from ``t_from`` to ``t_to`` (usf.taylor_coefficients)."""
        a_s, s_s, l_s = self._ab(t_from)
        a_t, s_t, l_t = self._ab(t_to)
        pred = decision.prediction
        if pred == "ddim":  # DDIM (Song et al. 2021, eq. 12): alpha_t x0 + sigma_t eps
            return a_t * base.x0 + s_t * base.eps_raw
        if t_to is None:  # clean-data target: the order-1 limit (h = inf); diffusers also steps first order here
            return base.x0 if pred == "data" else (x - s_s * base.eps) / a_s
        c_x, coefs = taylor_coefficients(pred, order, l_s, l_t, a_s, s_s, a_t, s_t, [p.lam for p in others],
                                         relaxation, decision.relaxation_coef)
        values = [base] + others
        out = c_x * x
        for c, p in zip(coefs, values):
            out = out + c * (p.x0 if pred == "data" else p.eps)
        return out

    def _predict(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Step ``i``: expand around its start point (capped by the history), derivatives from the most
        recent other points."""
        d = self.schedule.steps[i]
        hist = self._history
        b = max(len(hist) + d.start_point, 0)
        base = hist[b]
        order = min(d.order, len(hist))
        others = [p for j, p in enumerate(hist) if j != b][::-1][: order - 1]
        x_start = x if b == len(hist) - 1 else base.x
        last = i == self.schedule.num_steps - 1
        target = self.schedule.target(i)
        wants = d.corrector in ("pseudo", "implicit") and not last and d.prediction != "ddim"
        self._pending = _Pending(i, order, x_start, base, others) if wants else None
        return self._update(d, order, x_start, base.t, target, base, others, d.relaxation)

    def _correct(self, new: _Point) -> torch.Tensor:
        """Corrector (UniC): redo step j at order k+1 from its start, adding the new evaluation."""
        pend = self._pending
        self._pending = None
        d = self.schedule.steps[pend.step]
        relaxation = d.corrector_relaxation if pend.order == 1 else "none"
        return self._update(d, pend.order + 1, pend.x_start, pend.base.t, self.schedule.target(pend.step),
                            pend.base, [new] + pend.others, relaxation)

    # ------------------------------------------------------------------ protocol: misc
    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        a, s = self.noise_schedule.alpha_sigma(timesteps.detach().cpu().double())
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        a = a.to(original_samples.device, original_samples.dtype).reshape(shape)
        s = s.to(original_samples.device, original_samples.dtype).reshape(shape)
        return a * original_samples + s * noise

    def __len__(self) -> int:
        return self.config.num_train_timesteps


def _threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding (Saharia et al. 2022, Imagen), as diffusers' ``_threshold_sample``."""
    dtype = x0.dtype
    b = x0.shape[0]
    flat = x0.float().reshape(b, -1) if dtype not in (torch.float32, torch.float64) else x0.reshape(b, -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(dtype)


def _load_schedule(schedule) -> SolverSchedule:
    if isinstance(schedule, SolverSchedule):
        return schedule
    if isinstance(schedule, dict):
        return SolverSchedule.from_dict(schedule)
    if isinstance(schedule, (str, os.PathLike)):
        return SolverSchedule.load(Path(schedule))
    raise ValueError(f"schedule must be a SolverSchedule, its dict, or a path to its JSON; got {type(schedule).__name__}.")


__all__ = ["USFScheduler", "USFSchedulerOutput"]
