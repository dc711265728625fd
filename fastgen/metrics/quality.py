"""Sample-quality measures beside FID: improved precision/recall, saturation, class accuracy.

- Improved precision and recall: Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for
  Assessing Generative Models" (https://arxiv.org/abs/1904.06991).
- Mean HSV saturation: the over-saturation measure of Sadat et al. 2024, "Eliminating Oversaturation
  and Artifacts of High Guidance Scales in Diffusion Models" (APG, https://arxiv.org/abs/2410.02416),
  with two grey-scale analogues (grey images have zero saturation): mean absolute intensity in
  [-1, 1] and the share of pixels clipped at the ends of the range.
- Roughness: mean absolute difference of neighbouring pixels (total variation per pixel pair), a
  high-frequency-artefact measure (over-guided and under-resolved samples are grainy).
- RMS distance to a reference solution: how far a few-step solver lands from the many-step solution of the
  same ODE from the same noise (solver accuracy, as opposed to FID, which a solver can lower by landing
  somewhere else).
"""
from __future__ import annotations

import torch

__all__ = ["precision_recall", "knn_radii", "mean_saturation", "mean_abs_intensity", "clipped_fraction",
           "class_accuracy", "roughness", "roughness_per_image", "squared_error_sum", "rms_distance"]


def _features(name: str, x) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"{name} must be a non-empty [N, D] feature matrix, got shape {tuple(x.shape)}.")
    x = x.double()
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    return x


def _pairwise(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def knn_radii(features: torch.Tensor, k: int = 3, batch_size: int = 1024) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row (the manifold ball radius)."""
    n = features.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} samples, got {k}.")
    radii = []
    for start in range(0, n, batch_size):
        d = _pairwise(features[start:start + batch_size], features)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # the 1st smallest is the point itself (0)
    return torch.cat(radii)


def _coverage(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, batch_size: int) -> float:
    inside = []
    for start in range(0, queries.shape[0], batch_size):
        d = _pairwise(queries[start:start + batch_size], support)
        inside.append((d <= radii.unsqueeze(0)).any(dim=1))
    return float(torch.cat(inside).double().mean())


def precision_recall(real, fake, k: int = 3, batch_size: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds.

    Each set's manifold is the union of balls around its samples with radius the distance to the k-th
    nearest neighbour in the same set. Precision: share of fake samples inside the real manifold;
    recall: share of real samples inside the fake manifold. The paper uses k = 3.

    Args:
        real, fake: feature matrices ``[N, D]`` and ``[M, D]``.

    Returns:
        ``(precision, recall)`` in [0, 1].
    """
    real, fake = _features("real features", real), _features("fake features", fake)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions do not match: real has {real.shape[1]}, fake has {fake.shape[1]}.")
    precision = _coverage(fake, real, knn_radii(real, k, batch_size), batch_size)
    recall = _coverage(real, fake, knn_radii(fake, k, batch_size), batch_size)
    return precision, recall


def _images(images) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError("images must be a tensor [N, 1 or 3, H, W] in [0, 1] (or uint8).")
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.double()


def mean_saturation(images) -> float:
    """Mean HSV saturation ``(max - min) / max`` over pixels of RGB images in [0, 1] (Sadat et al. 2024).

    Black pixels (max = 0) count as saturation 0; grey-scale images have saturation 0 everywhere.
    """
    x = _images(images)
    if x.shape[1] == 1:
        return 0.0
    x = x.clamp(0, 1)
    high, low = x.max(dim=1).values, x.min(dim=1).values
    sat = torch.where(high > 0, (high - low) / high.clamp_min(1e-12), torch.zeros_like(high))
    return float(sat.mean())


def mean_abs_intensity(images) -> float:
    """Mean ``|x|`` with pixels mapped to [-1, 1]: the grey-scale analogue of saturation (1 = all pixels at the ends)."""
    return float((_images(images) * 2 - 1).abs().mean())


def clipped_fraction(images, tolerance: float = 0.5 / 255) -> float:
    """Share of pixel values within ``tolerance`` of 0 or 1 (the ends of the range, where over-guided samples pile up)."""
    x = _images(images)
    return float(((x <= tolerance) | (x >= 1 - tolerance)).double().mean())


def roughness_per_image(images) -> torch.Tensor:
    """Per-image roughness ``[N]`` (float64): see :func:`roughness`."""
    x = _images(images)
    horizontal = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1)
    vertical = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1)
    pairs = torch.cat([horizontal, vertical], dim=1)
    if pairs.shape[1] == 0:
        raise ValueError(f"roughness needs images of at least 2 pixels, got {tuple(x.shape[2:])}.")
    return pairs.mean(dim=1)


def roughness(images) -> float:
    """Mean absolute difference of neighbouring pixels of images ``[N, C, H, W]`` in [0, 1].

    Every horizontal pair ``(x[i, j], x[i, j+1])`` and vertical pair ``(x[i, j], x[i+1, j])`` of every
    channel counts once (an anisotropic total variation divided by the number of pairs): 0 for flat images,
    1 for a 0/1 checkerboard, 1/2 for 0/1 stripes on a square image. Averaged per image, then over images.
    """
    return float(roughness_per_image(images).mean())


def class_accuracy(predicted, labels) -> float:
    """Share of samples whose predicted class equals the class they were generated for."""
    predicted, labels = torch.as_tensor(predicted).flatten(), torch.as_tensor(labels).flatten()
    if predicted.shape != labels.shape or predicted.numel() == 0:
        raise ValueError(f"predicted and labels must be non-empty and of equal length, got {predicted.numel()} and "
                         f"{labels.numel()}.")
    return float((predicted.cpu() == labels.cpu()).double().mean())


def squared_error_sum(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Sum over all elements of ``(samples - reference)^2`` in float64 (the reducible part of :func:`rms_distance`)."""
    if tuple(samples.shape) != tuple(reference.shape):
        raise ValueError(f"samples and reference must have the same shape, got {tuple(samples.shape)} and "
                         f"{tuple(reference.shape)}.")
    return float(((samples.double() - reference.double().to(samples.device)) ** 2).sum())


def rms_distance(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Root mean square of ``samples - reference`` over every element (same shapes; e.g. images in [0, 1])."""
    return (squared_error_sum(samples, reference) / max(1, samples.numel())) ** 0.5
