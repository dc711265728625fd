"""Adaptive Projected Guidance (Sadat, Hilliges & Weber 2024, arXiv:2410.02416, ICLR 2025)."""
from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import GuiderOutput

from .base import CFGFamilyGuidance, check_number, per_sample_dims


class APG(CFGFamilyGuidance):
    r"""Adaptive Projected Guidance: CFG whose update keeps only (mostly) the part orthogonal to ``pred_cond``.

    Sadat, Hilliges & Weber, "Eliminating Oversaturation and Artifacts of High Guidance Scales in Diffusion
    Models", arXiv:2410.02416 (ICLR 2025), Algorithm 1. Per step, on data predictions D_c, D_u:

    1. Δ = D_c − D_u
    2. reverse momentum (``momentum`` β < 0): M ← Δ + β M, Δ ← M  (the buffer receives the raw Δ)
    3. norm threshold (``norm_threshold`` r > 0): Δ ← Δ · min(1, r / ‖Δ‖), norm per sample over ``norm_dims``
    4. projection onto D_c in float64: Δ∥ = ⟨Δ, û⟩ û with û = D_c/‖D_c‖, Δ⊥ = Δ − Δ∥
    5. update = Δ⊥ + η Δ∥ (``eta`` η)
    6. D̂ = D_c + (w − 1) · update  — **cond-anchored**, as in the paper.

    With η = 1, r = 0 and no momentum this is plain CFG ``D_u + w (D_c − D_u)``. diffusers'
    ``AdaptiveProjectedGuidance(guidance_scale=w-1, use_original_formulation=True, eta=η,
    adaptive_projected_guidance_rescale=r, adaptive_projected_guidance_momentum=β)`` computes the same thing.

    Defaults are the paper's Stable Diffusion XL values (η = 0, r = 15, β = −0.5). r is in the units of the
    guided space and grows with the number of elements (‖Δ‖ ~ sqrt(numel)): it does not carry over between
    resolutions, latent shapes or prediction spaces; calibrate it per model. The FastGen loop feeds data (x0)
    predictions by default (``guidance_space="x0"``), as the paper recommends; diffusers' modular pipelines feed
    the raw model output.

    The momentum buffer is zeroed at the start of every run (``begin_run``, or when ``set_state`` sees the step
    index go back), including runs that start mid-schedule, and is updated once per ``forward`` call with two
    predictions (second-order samplers that guide twice per step update it twice, as diffusers does).

    Args:
        guidance_scale: w, CFG's meaning (1 = no guidance).
        eta: η, weight of the parallel component (paper: 0).
        norm_threshold: r; 0 disables the norm clipping.
        momentum: β (paper: −0.5); ``None`` or 0 disables momentum.
        norm_dims: dimensions of the per-sample norm and projection; ``None`` = all non-batch dimensions.
        guidance_rescale: std-rescale of Lin et al. 2023 applied after the combine (0 = off).
        start, stop: guidance window as fractions of the steps.
        enabled: ``False`` runs conditional only.
    """

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.5,
        eta: float = 0.0,
        norm_threshold: float = 15.0,
        momentum: float | None = -0.5,
        norm_dims: list[int] | None = None,
        guidance_rescale: float = 0.0,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
    ):
        check_number("eta", eta)
        check_number("norm_threshold", norm_threshold, low=0.0)
        check_number("momentum", momentum, low=-1.0, high=1.0, allow_none=True)
        check_number("guidance_rescale", guidance_rescale, low=0.0, high=1.0)
        if norm_dims is not None and (not isinstance(norm_dims, (list, tuple)) or not norm_dims
                                      or not all(isinstance(d, int) and not isinstance(d, bool) and d != 0
                                                 for d in norm_dims)):
            raise ValueError(f"norm_dims must be None or a non-empty list of non-batch dimension indices, got {norm_dims!r}.")
        self.eta = float(eta)
        self.norm_threshold = float(norm_threshold)
        self.momentum = None if momentum is None or momentum == 0 else float(momentum)
        self.norm_dims = None if norm_dims is None else [int(d) for d in norm_dims]
        self.guidance_rescale = float(guidance_rescale)
        super().__init__(guidance_scale, start, stop, enabled)

    def reset_run_state(self) -> None:
        super().reset_run_state()
        self.momentum_buffer: torch.Tensor | None = None

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None) -> GuiderOutput:
        if pred_uncond is None or not self._guidance_active():
            pred = pred_cond
        else:
            update = self.update(pred_cond, pred_uncond)
            pred = pred_cond + (self.guidance_scale - 1.0) * update  # D̂ = D_c + (w − 1)·update
        return GuiderOutput(pred=self._rescale(pred, pred_cond), pred_cond=pred_cond, pred_uncond=pred_uncond)

    def update(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor) -> torch.Tensor:
        """The APG update Δ⊥ + η Δ∥ (steps 1-5 of Algorithm 1); advances the momentum buffer."""
        dims = self.norm_dims or per_sample_dims(pred_cond)
        diff = pred_cond - pred_uncond
        if self.momentum is not None:  # M ← Δ + β M
            previous = self.momentum_buffer if self.momentum_buffer is not None else 0
            self.momentum_buffer = diff + self.momentum * previous
            diff = self.momentum_buffer
        if self.norm_threshold > 0:  # Δ ← Δ min(1, r/‖Δ‖)
            norm = diff.norm(p=2, dim=dims, keepdim=True)
            diff = diff * torch.minimum(torch.ones_like(diff), self.norm_threshold / norm)
        v0, v1 = diff.double(), pred_cond.double()
        if v0.device.type in {"mps", "npu"}:  # no float64 there
            v0, v1 = v0.cpu(), v1.cpu()
        unit = torch.nn.functional.normalize(v1, dim=dims)
        parallel = (v0 * unit).sum(dim=dims, keepdim=True) * unit
        orthogonal = v0 - parallel
        parallel = parallel.to(device=diff.device, dtype=diff.dtype)
        orthogonal = orthogonal.to(device=diff.device, dtype=diff.dtype)
        return orthogonal + self.eta * parallel
