"""Denoiser and GuidedDenoiser: the only callers of a diffusion network, for sampling and for training.

Following the k-diffusion/EDM split (Karras et al. 2022, arXiv:2206.00364), a network is wrapped once:

* :class:`Denoiser` is the network plus its parameterisation and training noise schedule: model input
  ``x_t = alpha x0 + sigma eps`` and network time ``t`` -> raw output, ``x0``, ``eps``.
* :class:`GuidedDenoiser` adds the condition, the unconditional branch and a guider (CFG, APG, AG, ...):
  ``(x_t, t) -> Prediction(x0, eps, model_output, nfe_per_row)``. It decides which branches run, runs them
  in one batch, and hands the guider predictions in the guidance space (data predictions by default).

Samplers, the distillation teacher (guided ``x0`` without grad) and the fake score (with grad) all call a
``GuidedDenoiser``, so NFE accounting and batching live here and nowhere else.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .parameterization import PREDICTION_TYPES, Parameterization
from .schedule import NoiseSchedule, is_flow_config

GUIDANCE_SPACES = ("x0", "model")
_DATA = Parameterization("sample")
_NOISE = Parameterization("epsilon")

__all__ = ["Denoiser", "GUIDANCE_SPACES", "GuidanceContext", "GuidedDenoiser", "PREDICTION_TYPES", "Prediction",
           "concat_conditions", "select_rows"]


def _model_family(model: torch.nn.Module) -> str:
    """How the network is called: ``"unet"`` (x, t positional) or ``"transformer"`` (hidden_states=)."""
    name = type(model).__name__
    if name.startswith("UNet"):
        return "unet"
    if "Transformer" in name or name.startswith("DiT"):
        return "transformer"
    raise TypeError(
        f"model must be a diffusers UNet2DModel, UNet2DConditionModel, DiT/Transformer2DModel or "
        f"SD3Transformer2DModel, got {name}."
    )


def concat_conditions(conds: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Concatenate condition dicts along the batch (tensors, nested dicts, lists of tensors); other values
    must agree."""
    out: dict[str, Any] = {}
    for key in conds[0]:
        values = [c[key] for c in conds]
        first = values[0]
        if isinstance(first, torch.Tensor):
            out[key] = torch.cat(values, dim=0)
        elif isinstance(first, Mapping):
            out[key] = concat_conditions(values)
        elif isinstance(first, (list, tuple)) and first and all(isinstance(v, torch.Tensor) for v in first):
            out[key] = type(first)(torch.cat(parts, dim=0) for parts in zip(*values))
        else:
            out[key] = first
    return out


def select_rows(condition: Mapping[str, Any], index: torch.Tensor, batch: int) -> dict[str, Any]:
    """The rows ``index`` of a condition dict: tensors (and lists of tensors) whose first dimension is the batch."""
    out: dict[str, Any] = {}
    for key, value in condition.items():
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
            out[key] = value[index.to(value.device)]
        elif isinstance(value, Mapping):
            out[key] = select_rows(value, index, batch)
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
            out[key] = type(value)(v[index.to(v.device)] if v.ndim > 0 and v.shape[0] == batch else v for v in value)
        else:
            out[key] = value
    return out


class Denoiser(torch.nn.Module):
    """A diffusers network, its parameterisation and its training noise schedule.

    Args:
        model: ``UNet2DModel``, ``UNet2DConditionModel``, ``DiTTransformer2DModel``/``Transformer2DModel``
            or ``SD3Transformer2DModel`` (a submodule: it follows ``.to()``, ``train()`` and autograd).
        schedule: the model's training :class:`~fastgen.schedule.NoiseSchedule`.
        prediction_type: see :mod:`fastgen.parameterization`.

    The schedule's tables are copied once to each device the denoiser runs on, so ``alpha(t)``/``sigma(t)``
    are computed there without a host round trip. Networks that also output a learned variance
    (``out_channels == 2 * in_channels``, as DiT) have those channels dropped, as diffusers' DiTPipeline does.
    """

    def __init__(self, model: torch.nn.Module, schedule: NoiseSchedule, prediction_type: str = "epsilon"):
        super().__init__()
        self.parameterization = Parameterization(prediction_type)
        self.family = _model_family(model)
        self.model = model
        self.schedule = schedule
        self._schedules: dict[torch.device, NoiseSchedule] = {}

    @property
    def prediction_type(self) -> str:
        return self.parameterization.name

    @classmethod
    def from_scheduler(cls, model: torch.nn.Module, scheduler) -> "Denoiser":
        """Build from a model and the diffusers scheduler it was trained with (any flow-matching config, a
        FlowMatch scheduler or a solver in flow mode, means ``prediction_type="flow"``)."""
        if is_flow_config(scheduler):
            prediction_type = "flow"
        else:
            prediction_type = scheduler.config.get("prediction_type", "epsilon") or "epsilon"
        return cls(model, NoiseSchedule.from_scheduler_config(scheduler), prediction_type)

    # ------------------------------------------------------------------ network call
    def forward(self, x: torch.Tensor, t, cond: Mapping[str, Any]) -> torch.Tensor:
        """One network evaluation: the raw output at model input ``x`` and network time ``t`` (scalar or [B])."""
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        if self.family == "unet":
            out = self.model(x, t, **cond, return_dict=False)[0]
        else:
            out = self.model(hidden_states=x, timestep=t, **cond, return_dict=False)[0]
        if out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]
        return out

    # ------------------------------------------------------------------ parameterisation
    def alpha_sigma(self, t, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``alpha(t), sigma(t)`` in ``like``'s dtype and device, shaped to broadcast against it (one value per
        row when ``t`` has one per row)."""
        schedule = self._schedules.get(like.device)
        if schedule is None:
            schedule = self._schedules[like.device] = self.schedule.to(like.device)
        a, s = schedule.alpha_sigma(t)
        shape = (-1,) + (1,) * (like.ndim - 1) if a.ndim else ()
        return a.to(like.dtype).reshape(shape), s.to(like.dtype).reshape(shape)

    def to_x0_eps(self, out: torch.Tensor, x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Data and noise predictions from the raw output ``out`` at model input ``x``."""
        return self.parameterization.to_x0_eps(out, x, *self.alpha_sigma(t, x))

    def from_x0(self, x0: torch.Tensor, x: torch.Tensor, t) -> torch.Tensor:
        """The raw output that corresponds to data prediction ``x0`` at model input ``x``."""
        return self.parameterization.from_x0(x0, x, *self.alpha_sigma(t, x))

    def predict(self, x: torch.Tensor, t, cond: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """One evaluation, as ``(x0, eps)``."""
        return self.to_x0_eps(self(x, t, cond), x, t)


class GuidanceContext:
    """What a guider may read at one step besides the predictions (handed over by ``set_model_input``).

    ``x`` is the model input x_t, ``timestep`` the network time, ``space`` the space of the predictions the
    guider receives (``"x0"`` or ``"model"``: the network's own parameterisation). ``alpha``/``sigma``
    (x_t = alpha x0 + sigma eps) are computed on first use.
    """

    def __init__(self, denoiser: Denoiser, x: torch.Tensor, timestep, space: str):
        self.denoiser, self.x, self.timestep, self.space = denoiser, x, timestep, space
        self._space = _DATA if space == "x0" else denoiser.parameterization
        self._ab: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def alpha(self) -> torch.Tensor:
        return self.alpha_sigma[0]

    @property
    def sigma(self) -> torch.Tensor:
        return self.alpha_sigma[1]

    @property
    def alpha_sigma(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._ab is None:
            self._ab = self.denoiser.alpha_sigma(self.timestep, self.x)
        return self._ab

    @property
    def prediction_type(self) -> str:
        return self.denoiser.prediction_type

    def to_x0(self, pred: torch.Tensor) -> torch.Tensor:
        """A prediction in ``space`` as a data prediction."""
        return self._space.to_x0(pred, self.x, *self.alpha_sigma)

    def to_eps(self, pred: torch.Tensor) -> torch.Tensor:
        """A prediction in ``space`` as a noise prediction."""
        return self._space.to_x0_eps(pred, self.x, *self.alpha_sigma)[1]

    def from_eps(self, eps: torch.Tensor) -> torch.Tensor:
        """The prediction in ``space`` that corresponds to noise prediction ``eps``."""
        x0 = _NOISE.to_x0(eps, self.x, *self.alpha_sigma)
        return self._space.from_x0(x0, self.x, *self.alpha_sigma)

    def model_to_space(self, raw: torch.Tensor) -> torch.Tensor:
        return raw if self.space == "model" else self.denoiser.parameterization.to_x0(raw, self.x, *self.alpha_sigma)

    def space_to_model(self, pred: torch.Tensor) -> torch.Tensor:
        return pred if self.space == "model" else self.denoiser.parameterization.from_x0(pred, self.x, *self.alpha_sigma)


class Prediction:
    """One (guided) denoiser evaluation: ``model_output`` in the network's parameterisation, ``x0`` and
    ``eps`` (computed on first use), and ``nfe_per_row`` (network evaluations per row; a CFG row counts 2)."""

    __slots__ = ("model_output", "nfe_per_row", "_context", "_x0", "_eps")

    def __init__(self, model_output: torch.Tensor, nfe_per_row: torch.Tensor, context: GuidanceContext,
                 x0: torch.Tensor | None = None):
        self.model_output, self.nfe_per_row, self._context = model_output, nfe_per_row, context
        self._x0, self._eps = x0, None

    @property
    def x0(self) -> torch.Tensor:
        if self._x0 is None:
            c = self._context
            self._x0 = c.denoiser.parameterization.to_x0(self.model_output, c.x, *c.alpha_sigma)
        return self._x0

    @property
    def eps(self) -> torch.Tensor:
        if self._eps is None:
            self._eps = _DATA.to_x0_eps(self.x0, self._context.x, *self._context.alpha_sigma)[1]
        return self._eps


class GuidedDenoiser(torch.nn.Module):
    """A :class:`Denoiser` with its condition, unconditional branch and guider: ``(x_t, t) -> Prediction``.

    Args:
        denoiser: the network.
        guider: ``None`` (conditional only) or a guider: fastgen's (CFG, APG, AG, LinearAG) or any diffusers
            ``BaseGuidance`` (driven with diffusers' per-step protocol; fastgen's loop hooks get no-op defaults,
            see :mod:`fastgen.guidance.base`).
        cond, uncond: network keyword arguments of the two branches (overridable per call).
        guidance_space: ``"x0"`` (the guider combines data predictions, as APG recommends) or ``"model"`` (raw
            outputs). Linear rules (CFG without rescale) give the same result in either space and run on the raw
            outputs, as diffusers does.

    Call with ``step=i`` inside a sampling run (after :meth:`begin_run`) so the guider's step window and run
    state apply; with ``step=None`` (training) the guider is active whenever its scale is not 1, and ``t``
    may hold one time per row. Works under ``torch.no_grad()`` and autograd, on any device and in autocast.
    """

    def __init__(self, denoiser: Denoiser, guider=None, cond: Mapping[str, Any] | None = None,
                 uncond: Mapping[str, Any] | None = None, guidance_space: str = "x0"):
        super().__init__()
        from .guidance.base import as_loop_guider, is_linear_guider

        if guidance_space not in GUIDANCE_SPACES:
            raise ValueError(f"guidance_space must be one of {GUIDANCE_SPACES}, got {guidance_space!r}.")
        self.denoiser = denoiser
        self.guider = as_loop_guider(guider)
        self.cond, self.uncond = cond, uncond
        self.guidance_space = "model" if is_linear_guider(guider) else guidance_space
        self._num_steps: int | None = None

    def begin_run(self, num_inference_steps: int, start_step: int = 0, batch_size: int | None = None,
                  scheduler=None) -> None:
        """A sampling run of ``num_inference_steps`` starts at ``start_step``: reset the guider's run state."""
        self._num_steps = num_inference_steps
        if self.guider is not None:
            self.guider.begin_run(num_inference_steps, start_step, batch_size, scheduler=scheduler)

    def step_record(self) -> dict[str, Any]:
        """What the guider logs for the current step (e.g. Adaptive Guidance's similarity)."""
        return {} if self.guider is None else self.guider.step_record()

    def forward(self, x: torch.Tensor, t, cond: Mapping[str, Any] | None = None,
                uncond: Mapping[str, Any] | None = None, step: int | None = None) -> Prediction:
        cond = self.cond if cond is None else cond
        uncond = self.uncond if uncond is None else uncond
        g = self.guider
        context = GuidanceContext(self.denoiser, x, t, self.guidance_space)
        ones = torch.ones(x.shape[0], dtype=torch.long)
        if g is None:
            return Prediction(self.denoiser(x, t, cond), ones, context)
        if uncond is None:
            raise ValueError("guidance needs an unconditional branch (uncond); pass uncond or guider=None.")
        if step is not None:
            g.set_state(step=step, num_inference_steps=self._num_steps, timestep=t)
        else:  # outside a sampling run every call stands alone: no momentum or truncation carried over
            g.reset_run_state()
        g.set_model_input(context)
        n = g.num_conditions
        if n == 1:
            raw = self.denoiser(x, t, cond)
            if not g.wants_conditional_forward:
                return Prediction(raw, ones, context)
            return self._combine(context, raw, None, ones)
        if n != 2:
            raise ValueError(f"guidance {type(g).__name__} asked for {n} evaluations; fastgen runs 1 (conditional) "
                             f"or 2 (conditional + unconditional).")
        rows = g.uncond_rows()
        if rows is None or bool(rows.all()):
            # One batched forward, unconditional first, as diffusers' pipelines order it.
            tt = torch.as_tensor(t)
            raw_uncond, raw_cond = self.denoiser(torch.cat([x, x]), torch.cat([tt, tt]) if tt.ndim else t,
                                                 concat_conditions([uncond, cond])).chunk(2)
            return self._combine(context, raw_cond, raw_uncond, ones * 2)
        # Per-row split (per-sample Adaptive Guidance): the unconditional branch only for ``rows``; the other
        # rows see pred_uncond = pred_cond and cost one evaluation.
        index = rows.to(x.device).nonzero().squeeze(1)
        tt = torch.as_tensor(t, device=x.device)
        t_part = torch.cat([tt[index], tt]) if tt.ndim else t
        batch = x.shape[0]
        raw = self.denoiser(torch.cat([x[index], x]), t_part,
                            concat_conditions([select_rows(uncond, index, batch), cond]))
        raw_cond = raw[len(index):]
        raw_uncond = raw_cond.clone()
        raw_uncond[index] = raw[: len(index)]
        return self._combine(context, raw_cond, raw_uncond, ones + rows.cpu().long())

    def _combine(self, context: GuidanceContext, raw_cond, raw_uncond, nfe: torch.Tensor) -> Prediction:
        """The guider's combination in the guidance space, returned in the network's parameterisation."""
        pred_cond = context.model_to_space(raw_cond)
        pred_uncond = None if raw_uncond is None else context.model_to_space(raw_uncond)
        pred = self.guider.forward(pred_cond=pred_cond, pred_uncond=pred_uncond).pred
        if context.space == "model":
            return Prediction(pred, nfe, context)
        return Prediction(context.space_to_model(pred), nfe, context, x0=pred)
