"""Shared machinery of fastgen's guiders: the loop-hook protocol and the CFG-family base class.

Every guider here is a ``diffusers.guiders.BaseGuidance``, driven per step with diffusers' protocol
(``set_state`` -> ``num_conditions`` -> ``forward``). The FastGen :class:`~fastgen.denoiser.GuidedDenoiser`
also talks to a guider through :class:`LoopGuider`, a ``typing.Protocol`` whose extra hooks have no-op defaults
in :class:`LoopHooks`; a guider from elsewhere (diffusers' own) is wrapped once by :func:`as_loop_guider`, so
the loop never asks ``hasattr``:

- ``prepare_call(model_path, scheduler, num_inference_steps)``: once per pipeline call, before any model work
  (LinearAG finds and checks its fitted coefficients here).
- ``begin_run(num_inference_steps, start_step, batch_size, scheduler)``: once per sampling run; resets run state
  (APG momentum, AG truncation flags, LinearAG history), also for runs that start mid-schedule. Without it
  (diffusers-driven runs) a new run is detected in ``set_state`` when the step index goes back.
- ``set_model_input(context)``: each evaluation, the :class:`~fastgen.denoiser.GuidanceContext` (x_t,
  alpha/sigma, the space of the predictions) so a guider can read predictions in another space.
- ``uncond_rows()``: which rows still need the unconditional evaluation (per-sample AG); ``None`` = all.
- ``wants_conditional_forward``: call ``forward(pred_cond=...)`` at conditional-only steps too (LinearAG).
- ``step_record()``: extra per-step log entries.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Protocol, runtime_checkable

import torch
from diffusers.guiders import BaseGuidance, ClassifierFreeGuidance
from diffusers.guiders.guider_utils import rescale_noise_cfg


def _quiet_experimental_warning():
    """diffusers logs an 'experimental' warning for every guider built; fastgen builds one per call. A filter,
    not ``setLevel``: changing a level clears every logger's cache, which costs milliseconds per call."""
    return _DropRecords(logging.getLogger("diffusers.guiders.guider_utils"))


class _DropRecords(logging.Filter):
    def __init__(self, logger: logging.Logger):
        super().__init__()
        self.logger = logger

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR

    def __enter__(self):
        self.logger.addFilter(self)

    def __exit__(self, *exc):
        self.logger.removeFilter(self)


def check_number(name: str, value, *, low: float | None = None, high: float | None = None,
                 allow_none: bool = False, low_open: bool = False) -> None:
    """Raise one ValueError naming ``name`` when ``value`` is not a number in the accepted range."""
    if value is None and allow_none:
        return
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        rng = f"{'(' if low_open or low is None else '['}{lo}, {hi}{']' if high is not None else ')'}"
        none = " or None" if allow_none else ""
        raise ValueError(f"{name} must be a number in {rng}{none}, got {value!r}.")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}.")



class LoopHooks:
    """No-op defaults of the FastGen loop hooks (see the module docstring); guiders override what they use."""

    wants_conditional_forward: bool = False

    def prepare_call(self, *, model_path=None, scheduler=None, num_inference_steps: int | None = None) -> None:
        """Once per pipeline call, before model work: resolve files and settings the run needs."""

    def begin_run(self, num_inference_steps: int, start_step: int = 0, batch_size: int | None = None,
                  scheduler=None) -> None:
        """A sampling run of ``num_inference_steps`` starts at ``start_step``."""

    def reset_run_state(self) -> None:
        """Forget what carries over between steps of a run (momentum, truncation flags)."""

    def set_model_input(self, context) -> None:
        """The model input and parameterisation of the current evaluation."""

    def uncond_rows(self) -> torch.Tensor | None:
        """Rows that need the unconditional branch (``None``: all)."""
        return None

    def step_record(self) -> dict[str, Any]:
        """Extra entries for the per-step log."""
        return {}

    def combines_linearly(self) -> bool:
        """True when the rule is affine in the predictions with weights summing to 1 per row (CFG and its
        truncations without rescale): then it gives the same result on data predictions as on raw outputs
        (every parameterisation is affine in x0 at fixed x_t), and the loop skips the conversions."""
        return False


@runtime_checkable
class LoopGuider(Protocol):
    """What :class:`~fastgen.denoiser.GuidedDenoiser` needs of a guider: diffusers' per-step protocol plus
    the :class:`LoopHooks`."""

    wants_conditional_forward: bool

    @property
    def num_conditions(self) -> int: ...

    def set_state(self, step: int, num_inference_steps: int, timestep) -> None: ...

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None): ...

    def prepare_call(self, *, model_path=None, scheduler=None, num_inference_steps: int | None = None) -> None: ...

    def begin_run(self, num_inference_steps: int, start_step: int = 0, batch_size: int | None = None,
                  scheduler=None) -> None: ...

    def reset_run_state(self) -> None: ...

    def set_model_input(self, context) -> None: ...

    def uncond_rows(self) -> torch.Tensor | None: ...

    def step_record(self) -> dict[str, Any]: ...


class _ForeignGuider(LoopHooks):
    """A diffusers guider without fastgen's hooks, driven through diffusers' protocol only."""

    def __init__(self, guider: BaseGuidance):
        self.inner = guider

    @property
    def num_conditions(self) -> int:
        return self.inner.num_conditions

    def set_state(self, step: int, num_inference_steps: int, timestep) -> None:
        self.inner.set_state(step=step, num_inference_steps=num_inference_steps, timestep=timestep)

    def forward(self, pred_cond, pred_uncond=None):
        if pred_uncond is None:
            return self.inner.forward(pred_cond=pred_cond)
        return self.inner.forward(pred_cond=pred_cond, pred_uncond=pred_uncond)


def as_loop_guider(guider) -> LoopGuider | None:
    """``guider`` itself when it implements :class:`LoopHooks`, else wrapped with no-op hooks."""
    if guider is None or isinstance(guider, LoopHooks):
        return guider
    if not isinstance(guider, BaseGuidance):
        raise TypeError(f"guidance must be a diffusers BaseGuidance object, got {type(guider).__name__}.")
    return _ForeignGuider(guider)


def is_linear_guider(guider) -> bool:
    """Whether ``guider`` combines linearly (see :meth:`LoopHooks.combines_linearly`; diffusers' own CFG without
    rescale does)."""
    if isinstance(guider, LoopHooks):
        return guider.combines_linearly()
    return isinstance(guider, ClassifierFreeGuidance) and not getattr(guider, "guidance_rescale", 0.0) > 0.0


class CFGFamilyGuidance(LoopHooks, BaseGuidance):
    """Base of the CFG-family guiders: two predictions (cond, uncond), a step window, run-state resets.

    Subclasses implement ``forward`` and ``reset_run_state``. Guidance is active at step i iff it is enabled,
    ``int(start*N) <= i < int(stop*N)`` and the scale is not 1 (diffusers' rule for skipping the
    unconditional forward).
    """

    _input_predictions = ["pred_cond", "pred_uncond"]

    def __init__(self, guidance_scale: float, start: float, stop: float, enabled: bool):
        check_number("guidance_scale", guidance_scale)
        check_number("start", start, low=0.0, high=1.0)
        check_number("stop", stop, low=0.0, high=1.0)
        if not (start < 1.0 and start <= stop):
            raise ValueError(f"start and stop must satisfy 0 <= start < 1 and start <= stop <= 1, got {start}, {stop}.")
        with _quiet_experimental_warning():
            super().__init__(start, stop, enabled)
        self.guidance_scale = float(guidance_scale)
        self.context = None
        self._last_step: int | None = None
        self._last_num_steps: int | None = None
        self.reset_run_state()

    # ------------------------------------------------------------------ run state
    def reset_run_state(self) -> None:
        """Forget everything carried between steps of one run (override and call super)."""
        self.context = None

    def begin_run(self, num_inference_steps: int, start_step: int = 0, batch_size: int | None = None,
                  scheduler=None) -> None:
        """FastGen hook: a new sampling run begins at ``start_step`` of ``num_inference_steps``."""
        self.reset_run_state()
        self._last_step, self._last_num_steps = None, num_inference_steps

    def set_state(self, step: int, num_inference_steps: int, timestep) -> None:
        new_run = (self._last_step is not None and step < self._last_step) or (
            self._last_num_steps is not None and num_inference_steps != self._last_num_steps)
        if new_run:  # diffusers-driven runs never call begin_run
            self.reset_run_state()
        self._last_step, self._last_num_steps = step, num_inference_steps
        super().set_state(step, num_inference_steps, timestep)

    def set_model_input(self, context) -> None:
        """FastGen hook: the model input and parameterisation of the current step."""
        self.context = context

    # ------------------------------------------------------------------ diffusers protocol
    def _guidance_active(self) -> bool:
        if not self._enabled:
            return False
        if self._num_inference_steps is not None and self._step is not None:
            lo, hi = int(self._start * self._num_inference_steps), int(self._stop * self._num_inference_steps)
            if not lo <= self._step < hi:
                return False
        return not math.isclose(self.guidance_scale, 1.0)

    @property
    def num_conditions(self) -> int:
        return 2 if self._guidance_active() else 1

    @property
    def is_conditional(self) -> bool:
        return self._count_prepared == 1

    def prepare_inputs(self, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list:
        indices = [0] if self.num_conditions == 1 else [0, 1]
        return [self._prepare_batch(data, idx, name) for idx, name in zip(indices, self._input_predictions)]

    def prepare_inputs_from_block_state(self, data, input_fields: dict[str, Any]) -> list:
        indices = [0] if self.num_conditions == 1 else [0, 1]
        return [self._prepare_batch_from_block_state(input_fields, data, idx, name)
                for idx, name in zip(indices, self._input_predictions)]

    def _rescale(self, pred: torch.Tensor, pred_cond: torch.Tensor) -> torch.Tensor:
        rescale = getattr(self, "guidance_rescale", 0.0)
        return rescale_noise_cfg(pred, pred_cond, rescale) if rescale > 0.0 else pred


def per_sample_dims(x: torch.Tensor) -> list[int]:
    """All non-batch dimensions (the paper's (C, H, W))."""
    return [-i for i in range(1, x.ndim)]
