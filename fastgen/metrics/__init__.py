"""Evaluation metrics and feature extractors (light imports only: no torchmetrics/torch-fidelity here)."""
from __future__ import annotations

from .digits import DigitsFeatureNet, load_digits_feature_net

__all__ = ["DigitsFeatureNet", "load_digits_feature_net"]

# Evaluation metrics (issue 3). These modules import torchmetrics/transformers only inside functions,
# so importing them here keeps ``import fastgen.metrics`` light.
from .fid import FeatureStats, fid_from_features, frechet_distance, kernel_inception_distance  # noqa: E402
from .quality import (class_accuracy, clipped_fraction, mean_abs_intensity, mean_saturation,  # noqa: E402
                      precision_recall)
from .stats import ReferenceStats, load_stats, save_stats  # noqa: E402
from .features import get_extractor  # noqa: E402
from .clip_score import clip_score, clip_score_metric  # noqa: E402
from .quality import roughness  # noqa: E402
from .stats import builtin_reference_path  # noqa: E402
from .evaluate import EvalResult, compute_reference, evaluate_images, evaluate_pipeline, load_reference  # noqa: E402
from .evaluate import resolve_state  # noqa: E402
from .evaluate import reference_solution  # noqa: E402
from .quality import rms_distance  # noqa: E402

__all__ += ["FeatureStats", "fid_from_features", "frechet_distance", "kernel_inception_distance", "class_accuracy",
            "clipped_fraction", "mean_abs_intensity", "mean_saturation", "precision_recall", "ReferenceStats",
            "load_stats", "save_stats", "get_extractor", "clip_score", "clip_score_metric", "roughness",
            "builtin_reference_path", "EvalResult", "compute_reference", "evaluate_images", "evaluate_pipeline",
            "load_reference", "resolve_state", "reference_solution", "rms_distance"]
