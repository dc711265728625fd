"""Classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598) as a diffusers guider."""
from __future__ import annotations

from diffusers.guiders import ClassifierFreeGuidance
from diffusers.configuration_utils import register_to_config

from .base import LoopHooks, _quiet_experimental_warning


class CFG(LoopHooks, ClassifierFreeGuidance):
    """Classifier-free guidance: ``pred = uncond + w (cond - uncond)`` (diffusers' formulation).

    Ho & Salimans, "Classifier-Free Diffusion Guidance", arXiv:2207.12598. ``guidance_scale`` w keeps
    diffusers' meaning: 1 disables guidance (one network evaluation per step), w > 1 runs the
    conditional and unconditional branches. ``start``/``stop`` restrict guidance to a fraction of the
    steps (limited-interval guidance). A subclass of diffusers' ``ClassifierFreeGuidance``, so it saves,
    reloads and runs in modular pipelines; in FastGen pipelines it acts on data (x0) predictions by
    default, which for this linear rule equals acting on the raw model output.
    """

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        use_original_formulation: bool = False,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
    ):
        with _quiet_experimental_warning():
            super().__init__(guidance_scale, guidance_rescale, use_original_formulation, start, stop, enabled)

    def combines_linearly(self) -> bool:
        return not self.guidance_rescale > 0.0
