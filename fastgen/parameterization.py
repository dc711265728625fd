"""What a diffusion network predicts, and the one copy of the formulas that convert it.

With ``x_t = alpha x0 + sigma eps`` (Kingma et al. 2021, VDM notation), every parameterisation is an affine
function of ``(x0, eps)`` at fixed ``x_t``:

============  ================================  ==============================================
name          network output                    reference
============  ================================  ==============================================
epsilon       eps                               Ho et al. 2020, DDPM, arXiv:2006.11239
v_prediction  v = alpha eps - sigma x0          Salimans & Ho 2022, arXiv:2202.00512
sample        x0                                (direct data prediction)
flow          u = eps - x0  (alpha = 1 - sigma)  Liu et al. 2022, rectified flow, arXiv:2209.03003
============  ================================  ==============================================

``Denoiser``, ``GuidedDenoiser``, guidance contexts and ``USFScheduler`` all convert through
:class:`Parameterization`; nothing else writes these formulas.
"""
from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
# diffusers' spelling of the flow-matching prediction in solver configs.
_ALIASES = {"flow_prediction": "flow"}


class Parameterization:
    """Convert a network output to data/noise predictions and back.

    Args:
        name: ``"epsilon"``, ``"v_prediction"``, ``"sample"`` or ``"flow"`` (diffusers' ``"flow_prediction"``
            is accepted as ``"flow"``).

    ``alpha``/``sigma`` are tensors (or floats) broadcastable against ``x``; ``v_prediction`` assumes a
    variance-preserving schedule (alpha^2 + sigma^2 = 1) and ``flow`` a rectified-flow one (alpha + sigma = 1),
    as the models that use them are trained.
    """

    __slots__ = ("name",)

    def __init__(self, name: str):
        name = _ALIASES.get(name, name)
        if name not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES} (or 'flow_prediction'), got {name!r}.")
        self.name = name

    def to_x0_eps(self, out: torch.Tensor, x: torch.Tensor, alpha, sigma) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0, eps)`` from the network output ``out`` at ``x = alpha x0 + sigma eps``."""
        p = self.name
        if p == "epsilon":
            return (x - sigma * out) / alpha, out
        if p == "v_prediction":  # v = a eps - s x0, a^2 + s^2 = 1
            return alpha * x - sigma * out, sigma * x + alpha * out
        if p == "sample":
            return out, (x - alpha * out) / sigma
        return x - sigma * out, x + alpha * out  # flow: u = eps - x0, a = 1 - s

    def to_x0(self, out: torch.Tensor, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """Only the data prediction (one formula less than :meth:`to_x0_eps` where it matters)."""
        p = self.name
        if p == "epsilon":
            return (x - sigma * out) / alpha
        if p == "v_prediction":
            return alpha * x - sigma * out
        if p == "sample":
            return out
        return x - sigma * out

    def from_x0(self, x0: torch.Tensor, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """The network output that corresponds to data prediction ``x0`` at ``x``."""
        p = self.name
        if p == "sample":
            return x0
        eps = (x - alpha * x0) / sigma
        if p == "epsilon":
            return eps
        if p == "v_prediction":
            return alpha * eps - sigma * x0
        return eps - x0

    def x0_gain(self, alpha, sigma):
        """``|d x0 / d out|``: how much a unit change of the network output moves the data prediction
        (``sigma / alpha`` for epsilon, ``sigma`` for v and flow, 1 for sample)."""
        return abs(self.to_x0(1.0, 0.0, alpha, sigma))

    def __eq__(self, other) -> bool:
        return isinstance(other, Parameterization) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"Parameterization({self.name!r})"
