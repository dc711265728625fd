"""Shared machinery of fastgen's CFG-family guiders: the diffusers guider protocol plus fastgen's run hooks.

Every guider here is a ``diffusers.guiders.BaseGuidance``. Besides the diffusers per-step protocol
(``set_state`` -> ``prepare_inputs`` / ``num_conditions`` -> ``forward``) the FastGen sampling loop calls
optional hooks that diffusers' modular pipelines never call, so a guider must also work without them:

- ``begin_run(num_inference_steps, start_step, batch_size, ...)``: once per sampling run, before any network
  call; resets run state (APG momentum, AG truncation flags, LinearAG history). Runs that start mid-schedule
  (teleportation, img2img) get a clean state too. Without the hook (diffusers-driven runs) a new run is
  detected in ``set_state`` when the step index goes back or ``num_inference_steps`` changes.
- ``set_model_input(context)``: each step, the :class:`~fastgen.sampling.GuidanceContext` (model input
  ``x_t``, alpha/sigma, the space of the predictions) so a guider can read predictions in another space.
- ``uncond_rows()``: which samples still need the unconditional evaluation (per-sample Adaptive Guidance);
  ``None`` means all of them.
- ``wants_conditional_forward``: call ``forward(pred_cond=...)`` even at conditional-only steps (LinearAG).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.guiders import BaseGuidance
from diffusers.guiders.guider_utils import rescale_noise_cfg

from .cfg import _quiet_experimental_warning


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


class CFGFamilyGuidance(BaseGuidance):
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

    def begin_run(self, num_inference_steps: int, start_step: int = 0, batch_size: int | None = None, **info) -> None:
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

    def uncond_rows(self) -> torch.Tensor | None:
        return None

    @property
    def wants_conditional_forward(self) -> bool:
        return False

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
