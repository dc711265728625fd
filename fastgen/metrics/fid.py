"""Fréchet distance (FID) and kernel distance (KID) on any feature space.

FID: Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium" (https://arxiv.org/abs/1706.08500). KID: Bińkowski et al. 2018, "Demystifying MMD GANs"
(https://arxiv.org/abs/1801.01401).

Features are accumulated as sufficient statistics (count, sum, sum of outer products) in float64, the
same state that torchmetrics' ``FrechetInceptionDistance`` keeps, so that many processes can each
accumulate a share of the samples and add their states (EDM's ``fid.py`` does the same). torchmetrics
is imported lazily: ``import fastgen.metrics`` stays light.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = [
    "FeatureStats",
    "frechet_distance",
    "fid_from_features",
    "kernel_inception_distance",
    "torchmetrics_fid",
    "inject_reference_stats",
]


def _as_float64(name: str, value, ndim: int) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().double().numpy()
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-d array, got shape {array.shape}.")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values.")
    return array


def _sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a positive semi-definite matrix through its eigendecomposition."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017), in float64.

    ``d² = |mu1 - mu2|² + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^½)``. The trace of the matrix
    square root comes from eigendecompositions, never from a complex ``sqrtm`` or an ad-hoc diagonal
    offset: with ``A = sigma1^½ sigma2^½`` (symmetric PSD roots from ``eigh``, round-off negatives
    clipped to 0), ``A Aᵀ = sigma1^½ sigma2 sigma1^½`` is similar to ``sigma1 sigma2``, so the eigenvalues
    of ``(sigma1 sigma2)^½`` are the singular values of ``A`` and ``tr((sigma1 sigma2)^½) = Σ svd(A)``.
    Taking singular values of ``A`` instead of square roots of the eigenvalues of ``A Aᵀ`` keeps small
    eigenvalues accurate (no squaring of the condition number), so rank-deficient feature covariances
    (ReLU features that are always 0) still give ``FID(x, x) = 0`` to ~1e-12.

    Args:
        mu1, mu2: means ``[D]`` (numpy arrays or tensors; converted to float64).
        sigma1, sigma2: covariances ``[D, D]``.

    Returns:
        The distance as a Python float.
    """
    mu1, mu2 = _as_float64("mu1", mu1, 1), _as_float64("mu2", mu2, 1)
    sigma1, sigma2 = _as_float64("sigma1", sigma1, 2), _as_float64("sigma2", sigma2, 2)
    dim = mu1.shape[0]
    for name, value, shape in (("mu2", mu2, (dim,)), ("sigma1", sigma1, (dim, dim)), ("sigma2", sigma2, (dim, dim))):
        if value.shape != shape:
            raise ValueError(f"feature dimensions do not match: mu1 has {dim} features, so {name} must have shape "
                             f"{shape}, got {value.shape}.")
    trace_sqrt = float(np.linalg.svd(_sqrtm_psd(sigma1) @ _sqrtm_psd(sigma2), compute_uv=False).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


class FeatureStats:
    """Sufficient statistics of a feature set (count, float64 sum and sum of outer products).

    Optionally keeps the raw features (``keep_features=True``) with an integer index per row (e.g. the
    sample's seed), for metrics that need them (KID, precision/recall); rows are returned sorted by
    index, so the result does not depend on how samples were split across batches or processes.
    """

    def __init__(self, num_features: int, keep_features: bool = False):
        if not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}.")
        self.num_features = num_features
        self.keep_features = keep_features
        self.n = 0
        self.sum = torch.zeros(num_features, dtype=torch.float64)
        self.outer_sum = torch.zeros(num_features, num_features, dtype=torch.float64)
        self._features: list[torch.Tensor] = []
        self._index: list[torch.Tensor] = []

    def update(self, features: torch.Tensor, index: Sequence[int] | torch.Tensor | None = None) -> None:
        """Add a batch ``[N, D]`` of features; ``index`` (``[N]`` ints) orders the kept rows."""
        if not isinstance(features, torch.Tensor) or features.ndim != 2:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"features must be a [N, D] tensor, got {shape}.")
        if features.shape[1] != self.num_features:
            raise ValueError(f"features have {features.shape[1]} dimensions but these statistics expect "
                             f"{self.num_features}; the feature extractors of the two sets differ.")
        features = features.detach().cpu().double()
        if not torch.isfinite(features).all():
            bad = int((~torch.isfinite(features)).any(dim=1).sum())
            raise ValueError(f"features contain NaN or infinite values ({bad} of {features.shape[0]} rows); "
                             f"check the images (NaN pixels) and the feature extractor.")
        self.sum += features.sum(dim=0)
        self.outer_sum += features.T @ features
        if self.keep_features:
            if index is None:
                index = torch.arange(self.n, self.n + features.shape[0])
            index = torch.as_tensor(index, dtype=torch.long)
            if index.shape != (features.shape[0],):
                raise ValueError(f"index must have one entry per feature row ({features.shape[0]}), got {tuple(index.shape)}.")
            self._features.append(features.float())
            self._index.append(index)
        self.n += features.shape[0]

    @property
    def mu(self) -> np.ndarray:
        """Mean ``[D]`` (float64)."""
        if self.n < 1:
            raise ValueError("no features were accumulated; the image set is empty.")
        return (self.sum / self.n).numpy()

    @property
    def sigma(self) -> np.ndarray:
        """Unbiased covariance ``[D, D]`` (float64), from the sums: (Σxxᵀ - n μμᵀ) / (n - 1)."""
        if self.n < 2:
            raise ValueError(f"at least 2 samples are needed for a covariance, got {self.n}.")
        mu = self.sum / self.n
        return ((self.outer_sum - self.n * torch.outer(mu, mu)) / (self.n - 1)).numpy()

    @property
    def features(self) -> torch.Tensor:
        """Kept features ``[n, D]`` sorted by index (only with ``keep_features=True``)."""
        if not self.keep_features:
            raise ValueError("these statistics were built with keep_features=False; raw features are unavailable.")
        if not self._features:
            return torch.empty(0, self.num_features)
        index = torch.cat(self._index)
        return torch.cat(self._features)[torch.argsort(index, stable=True)]

    @property
    def index(self) -> torch.Tensor:
        """Indices of the kept rows, sorted."""
        return torch.sort(torch.cat(self._index)).values if self._index else torch.empty(0, dtype=torch.long)

    def reduce(self, state=None) -> "FeatureStats":
        """Sum the statistics of all processes (``accelerate``); every process gets the total.

        Args:
            state: an ``accelerate.PartialState`` (or ``Accelerator``); ``None`` or a single process
                leaves the statistics unchanged.
        """
        if state is None or getattr(state, "num_processes", 1) <= 1:
            return self
        from accelerate.utils import gather_object, reduce

        device = state.device
        self.sum = reduce(self.sum.to(device), reduction="sum").cpu()
        self.outer_sum = reduce(self.outer_sum.to(device), reduction="sum").cpu()
        self.n = int(reduce(torch.tensor([self.n], dtype=torch.float64, device=device), reduction="sum").item())
        if self.keep_features:
            local = (torch.cat(self._features) if self._features else torch.empty(0, self.num_features),
                     torch.cat(self._index) if self._index else torch.empty(0, dtype=torch.long))
            gathered = gather_object([(local[0].numpy(), local[1].numpy())])
            self._features = [torch.from_numpy(np.asarray(f)) for f, _ in gathered]
            self._index = [torch.from_numpy(np.asarray(i)) for _, i in gathered]
        return self


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two feature sets ``[N, D]`` (each needs at least 2 rows)."""
    stats = []
    for name, feats in (("real", real), ("fake", fake)):
        if not isinstance(feats, torch.Tensor) or feats.ndim != 2:
            raise ValueError(f"{name} features must be a [N, D] tensor.")
        s = FeatureStats(feats.shape[1])
        s.update(feats)
        stats.append(s)
    if stats[0].num_features != stats[1].num_features:
        raise ValueError(f"feature dimensions do not match: real has {stats[0].num_features}, fake has "
                         f"{stats[1].num_features}.")
    return frechet_distance(stats[0].mu, stats[0].sigma, stats[1].mu, stats[1].sigma)


class _Precomputed(torch.nn.Module):
    """Identity 'extractor' so torchmetrics metrics can be fed features directly."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.double()


def kernel_inception_distance(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
                              degree: int = 3, seed: int = 0) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018): unbiased polynomial-kernel MMD² averaged over random subsets.

    Computed by torchmetrics' ``KernelInceptionDistance`` on precomputed features; ``subset_size`` is
    capped at the smaller set size, and the subsets are drawn from a generator seeded with ``seed`` (the
    global torch RNG is left untouched), so the value is reproducible.

    Returns:
        ``(mean, std)`` over subsets.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake features must be [N, D] with the same D, got {tuple(real.shape)} and "
                         f"{tuple(fake.shape)}.")
    size = min(subset_size, real.shape[0], fake.shape[0])
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples in each set, got {real.shape[0]} real and {fake.shape[0]} fake.")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metric = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subsets=subsets, subset_size=size,
                                         degree=degree, sync_on_compute=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def inject_reference_stats(metric, mu, sigma, n: int) -> None:
    """Put reference statistics (mu, sigma from n samples) into a torchmetrics FID's real-feature state.

    The state is sufficient statistics: ``sum = n mu``, ``cov_sum = (n - 1) sigma + n mu muᵀ``,
    ``num = n``. Build the metric with ``reset_real_features=False`` so that ``reset()`` keeps them.
    """
    mu = torch.from_numpy(_as_float64("mu", mu, 1))
    sigma = torch.from_numpy(_as_float64("sigma", sigma, 2))
    dim = metric.real_features_sum.shape[0]
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise ValueError(f"reference statistics have {mu.shape[0]} features but the metric's extractor has {dim}.")
    if int(n) < 2:
        raise ValueError(f"n (reference sample count) must be at least 2, got {n}.")
    device = metric.real_features_sum.device
    metric.real_features_sum = (n * mu).to(device)
    metric.real_features_cov_sum = ((n - 1) * sigma + n * torch.outer(mu, mu)).to(device)
    metric.real_features_num_samples = torch.tensor(int(n), dtype=torch.long, device=device)


def torchmetrics_fid(extractor: torch.nn.Module, reference=None):
    """torchmetrics ``FrechetInceptionDistance`` on a custom feature extractor.

    Args:
        extractor: an ``nn.Module`` mapping images to ``[N, D]`` features with an int ``num_features``
            (e.g. from :func:`fastgen.metrics.features.get_extractor`, which returns float64 features so the
            metric computes in float64 end to end).
        reference: optional ``ReferenceStats`` (or ``(mu, sigma, n)``) injected as the real statistics.

    Returns:
        The metric, built with ``reset_real_features=False`` when a reference is given.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=extractor, reset_real_features=reference is None, sync_on_compute=False)
    if reference is not None:
        if isinstance(reference, tuple):
            mu, sigma, n = reference
        else:
            mu, sigma, n = reference.mu, reference.sigma, reference.n
        inject_reference_stats(metric, mu, sigma, n)
    return metric
