"""Evaluation metrics and feature extractors (light imports only: no torchmetrics/torch-fidelity here)."""
from __future__ import annotations

from .digits import DigitsFeatureNet, load_digits_feature_net

__all__ = ["DigitsFeatureNet", "load_digits_feature_net"]
