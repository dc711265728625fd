"""Classifier-free guidance limited to an interval of noise levels (Kynkäänniemi et al. 2024, arXiv:2404.07724)."""
from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import GuiderOutput

from .base import CFGFamilyGuidance, check_number

# The paper's interval for EDM2-XXL on ImageNet-512 (latents of std 0.5): guidance on for sigma in (0.28, 5.42].
PAPER_SIGMA_LOW = 0.28
PAPER_SIGMA_HIGH = 5.42


class CFGInterval(CFGFamilyGuidance):
    r"""CFG applied only in an interval of the sampling run, conditional-only (1 NFE per row) elsewhere.

    Kynkäänniemi, Aittala, Karras, Laine, Aila & Lehtinen, "Applying Guidance in a Limited Interval Improves
    Sample and Distribution Quality in Diffusion Models", arXiv:2404.07724 (NeurIPS 2024). Guidance at high noise
    levels pulls samples towards a few class modes (hurting diversity) and at low noise levels does little; the
    paper guides only for noise levels σ in (``sigma_low``, ``sigma_high``] and runs the conditional model alone
    outside. It is also the trivial way to save network evaluations: every unguided step costs 1 instead of 2.

    Inside the interval the rule is diffusers' CFG ``uncond + w (cond − uncond)``, operation for operation, so a
    run whose interval covers every step equals :class:`~fastgen.guidance.CFG`; outside it the prediction is the
    conditional one and the unconditional branch is not evaluated.

    **The interval.** A step is guided when both hold:

    - its index i satisfies ``int(start·N) <= i < int(stop·N)`` (fractions of the N steps, like every fastgen
      guider's window);
    - its noise level σ = σ_t/α_t (EDM's σ, for any VP or flow schedule: x_t/α_t = x0 + σ ε) lies in
      (``sigma_low``, ``sigma_high``]; ``None`` bounds are open. σ is read per row from the model input the loop
      hands over, so batches with one time per row (training) are guided row by row, and the network runs the
      unconditional branch only for the guided rows (exact per-row NFE).

    The default interval is the paper's for EDM2 on ImageNet-512, (0.28, 5.42]; it is in the units of data of std
    0.5 and does not carry over to every model unchanged (a built-in model's folder may recommend its own, see
    :mod:`fastgen.guidance.model_settings`). ``sigma_low=sigma_high=None`` with ``start``/``stop`` limits guidance
    to a window of steps instead (``stop=0.15``: the first 15% of the steps); with the full window too, this is
    plain CFG. In diffusers' modular pipelines (no model-input hook) only the step window applies; σ bounds there
    are an error.

    Args:
        guidance_scale: w (CFG's meaning; 1 = no guidance).
        sigma_low, sigma_high: the σ interval (σ_low, σ_high] (default: the paper's 0.28, 5.42); ``None`` =
            unbounded on that side.
        start, stop: the step window, as fractions of the steps.
        enabled: ``False`` runs conditional only.
    """

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.5,
        sigma_low: float | None = PAPER_SIGMA_LOW,
        sigma_high: float | None = PAPER_SIGMA_HIGH,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
    ):
        check_number("sigma_low", sigma_low, low=0.0, allow_none=True)
        check_number("sigma_high", sigma_high, low=0.0, allow_none=True, low_open=True)
        if sigma_low is not None and sigma_high is not None and not sigma_low < sigma_high:
            raise ValueError(f"sigma_low must be below sigma_high, got {sigma_low} and {sigma_high}.")
        self.sigma_low = None if sigma_low is None else float(sigma_low)
        self.sigma_high = None if sigma_high is None else float(sigma_high)
        super().__init__(guidance_scale, start, stop, enabled)

    def _has_sigma_bounds(self) -> bool:
        return self.sigma_low is not None or self.sigma_high is not None

    def rows_in_interval(self) -> torch.Tensor | None:
        """Per row, whether σ lies in (sigma_low, sigma_high] (``None``: no σ bounds, every row)."""
        if not self._has_sigma_bounds():
            return None
        if self.context is None:
            raise ValueError("CFGInterval with sigma_low/sigma_high needs the noise level of each evaluation, which "
                             "only FastGen's loop hands over; use start/stop (fractions of the steps) elsewhere.")
        alpha, sigma = self.context.alpha_sigma
        s = (torch.as_tensor(sigma, dtype=torch.float64) / torch.as_tensor(alpha, dtype=torch.float64)).reshape(-1)
        rows = self.context.x.shape[0]
        s = s.expand(rows) if s.numel() == 1 else s
        inside = torch.ones(rows, dtype=torch.bool, device=s.device)
        if self.sigma_low is not None:
            inside &= s > self.sigma_low
        if self.sigma_high is not None:
            inside &= s <= self.sigma_high
        return inside.cpu()

    def _active_rows(self) -> torch.Tensor | None:
        """Rows guided at this evaluation: ``None`` = all (step window and scale already checked by the caller)."""
        inside = self.rows_in_interval()
        return None if inside is None or bool(inside.all()) else inside

    @property
    def num_conditions(self) -> int:
        if not self._guidance_active():
            return 1
        rows = self._active_rows()
        return 2 if rows is None or bool(rows.any()) else 1

    def uncond_rows(self) -> torch.Tensor | None:
        return self._active_rows() if self._guidance_active() else None

    def combines_linearly(self) -> bool:
        return True  # CFG or the conditional prediction per row: affine with weights summing to 1

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None) -> GuiderOutput:
        if pred_uncond is None or not self._guidance_active():
            return GuiderOutput(pred=pred_cond, pred_cond=pred_cond, pred_uncond=pred_uncond)
        shift = pred_cond - pred_uncond
        pred = pred_uncond + self.guidance_scale * shift  # diffusers' CFG, same operations
        rows = self._active_rows()
        if rows is not None:
            pred = torch.where(rows.to(pred.device).view(-1, *[1] * (pred.ndim - 1)), pred, pred_cond)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)
