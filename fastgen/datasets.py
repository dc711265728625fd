"""Built-in datasets: scikit-learn's bundled handwritten digits, upsampled for diffusion models.

``sklearn.datasets.load_digits()`` holds 1,797 grey-scale 8x8 digits (intensities 0..16, UCI optdigits).
fastgen ships the same arrays as a package asset (``fastgen/assets/digits-data/digits.npz``, written by
``scripts/make_digits_data.py``), so the built-in models train and evaluate with no download and no
scikit-learn.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

DIGITS_ASSET = "digits-data/digits.npz"
SPLITS = ("features", "train", "heldout", "all")
_SPLIT_SEED = 0
_N_FEATURES = 500
_N_TRAIN = 1000


@lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits (float64 [1797, 8, 8], 0..16) and targets (int64), as ``load_digits()`` gives them,
    read once per process from the packaged asset."""
    from .builtin import asset_path

    path = asset_path(DIGITS_ASSET)
    try:
        with np.load(path, allow_pickle=False) as f:
            images, target = f["images"].astype(np.float64), f["target"].astype(np.int64)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"packaged digits data {str(path)!r} is unreadable ({err}); reinstall fastgen or "
                         f"rebuild it with scripts/make_digits_data.py.") from None
    images.flags.writeable = False
    target.flags.writeable = False
    return images, target


def digits_split_indices(split: str = "train") -> np.ndarray:
    """Indices into the 1,797 digits (``load_digits()`` order) of ``split`` (see :func:`load_digits_images`)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}.")
    n = len(_raw_digits()[1])
    perm = np.random.default_rng(_SPLIT_SEED).permutation(n)
    if split == "features":
        return perm[:_N_FEATURES]
    if split == "train":
        return perm[_N_FEATURES : _N_FEATURES + _N_TRAIN]
    if split == "heldout":
        return perm[_N_FEATURES + _N_TRAIN :]
    return np.arange(n)


def load_digits_images(split: str = "train", size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Load scikit-learn's handwritten digits as images in [-1, 1].

    The 1,797 images are split once by a fixed permutation (``numpy.random.default_rng(0)``), so
    every script sees the same disjoint parts:

    - ``"features"``: the first 500 permuted images, used only to train the digits feature
      network (``fastgen.metrics.DigitsFeatureNet``), so that it never saw what FID evaluates;
    - ``"train"``: the next 1,000, used to train the diffusion model and for FID reference
      statistics;
    - ``"heldout"``: the remaining 297, used only as a real-vs-real FID noise floor;
    - ``"all"``: all 1,797 in the original order.

    Args:
        split: one of ``"features"``, ``"train"``, ``"heldout"``, ``"all"``.
        size: output side length; the 8x8 images are resized with bilinear interpolation
            (``align_corners=False``, no antialiasing). ``8`` returns the originals.

    Returns:
        ``(images, labels)``: float32 ``[N, 1, size, size]`` in [-1, 1] and int64 ``[N]``.
    """
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive int (e.g. 16), got {size!r}.")
    idx = digits_split_indices(split)
    raw_images, raw_target = _raw_digits()
    images = torch.from_numpy(raw_images[idx].astype(np.float32)).unsqueeze(1) / 8.0 - 1.0
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    labels = torch.from_numpy(raw_target[idx].astype(np.int64))
    return images.contiguous(), labels
