"""f-distill: DMD2 with the distribution-matching gradient weighted per sample by an f-divergence's h(r).

Xu, Nie, Vahdat, *One-step Diffusion Models with f-Divergence Distribution Matching*,
arXiv:2502.15681. Minimising ``D_f(p_t || q_t)`` instead of the reverse KL multiplies DMD's score
difference by ``h(r) = f''(r) r^2`` at the student's noisy sample, with ``r = p_t / q_t`` read from
the GAN discriminator (``r = exp(logit)``, clamped, detached, clipped, normalised per time bin and
per batch; :mod:`fastgen.training.divergences`). Everything else is DMD2's, and ``divergence="rkl"``
(``h == 1`` with no statistics) *is* DMD2: same code path, same random draws, same bits.

The logits are those of the discriminator head on the same features DMD2's GAN uses (frozen teacher
by default), evaluated at the DM loss's ``(x_t, t)`` without gradient.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .divergences import FDivergenceWeight, RatioConfig
from .dmd2 import DMD2, DMD2Config


@dataclass
class FDistillConfig(RatioConfig, DMD2Config):
    """DMD2's options (:class:`~.dmd2.DMD2Config`) plus the divergence and ratio options of
    :class:`~.divergences.RatioConfig`; the time bins span the DM time range unless ``bin_t_min``/``bin_t_max``
    are given."""

    def __post_init__(self):
        DMD2Config.__post_init__(self)
        RatioConfig.__post_init__(self)
        if self.divergence != "rkl" and not self.use_gan:
            raise ValueError(f"divergence {self.divergence!r} needs the discriminator's density ratio: set "
                             f"gan_weight_discriminator > 0 (only 'rkl' runs without one).")

    def ratio_config(self) -> RatioConfig:
        values = {f.name: getattr(self, f.name) for f in fields(RatioConfig)}
        values["bin_t_min"] = float(self.dm_time[0]) if self.bin_t_min is None else self.bin_t_min
        values["bin_t_max"] = float(self.dm_time[1]) + 1.0 if self.bin_t_max is None else self.bin_t_max
        return RatioConfig(**values)


class FDistill(DMD2):
    """f-distill (arXiv:2502.15681) on top of :class:`~.dmd2.DMD2`; see the module docstring."""

    name = "fdistill"
    config_class = FDistillConfig

    def __init__(self, teacher, guider=None, config: FDistillConfig | None = None, **options):
        super().__init__(teacher, guider, config, **options)
        # Trainer state (spec 0.9): kept here, saved through trainer_state(), never a network buffer.
        self.__dict__["weighting"] = FDivergenceWeight(self.config.ratio_config())

    def dm_weight(self, x_t, t, cond):
        if self.weighting.is_identity:  # rkl: exactly DMD2
            return None, {}
        with torch.no_grad():
            logits = self._logits(x_t, t, cond, backbone_grad=False)
        h = self.weighting(logits, t)
        return h, {"h_min": h.min(), "h_mean": h.mean(), "h_max": h.max()}

    def trainer_state(self) -> dict:
        return {"ratio_ema": self.weighting.state_dict()}

    def load_trainer_state(self, state: dict) -> None:
        if state:
            self.weighting.load_state_dict(state["ratio_ema"])
