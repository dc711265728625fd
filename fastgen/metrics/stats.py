"""Reference statistics files (``.npz``): float64 ``mu`` [D] and ``sigma`` [D, D] plus metadata.

The layout is the one pytorch-fid, clean-fid and NVlabs/edm ``fid.py`` read and write (keys ``mu`` and
``sigma``), so files move between the tools; extra keys are metadata that those readers ignore:
``n`` (sample count), ``extractor`` (feature space name), ``resize_mode`` (how images were resized
before the extractor) and, optionally, ``features`` (the raw float32 features, for KID and
precision/recall, like clean-fid's ``feats``). Values are only comparable when the extractor and the
resizing match. Files are read with ``allow_pickle=False``: never unpickled.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["ReferenceStats", "load_stats", "save_stats", "builtin_reference_path", "BUILTIN_REFERENCES"]

_PACKAGE = Path(__file__).resolve().parents[1]  # fastgen/
BUILTIN_REFERENCES = {"digits": "digits_train_stats.npz"}  # name -> file name of the shipped statistics


@dataclass
class ReferenceStats:
    """Gaussian statistics of a feature set (Heusel et al. 2017): the FID reference.

    Attributes:
        mu: float64 mean ``[D]``.
        sigma: float64 covariance ``[D, D]``.
        n: number of samples (``0`` when a foreign file does not say).
        extractor: feature space name (``"digits"``, ``"inception"``, ``"clip:<model>"``, or ``"unknown"``).
        resize_mode: how images were resized before feature extraction (``"unknown"`` if not recorded).
        features: optional float32 raw features ``[n, D]``.
        meta: any other string metadata.
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int = 0
    extractor: str = "unknown"
    resize_mode: str = "unknown"
    features: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.mu = np.asarray(self.mu, dtype=np.float64)
        self.sigma = np.asarray(self.sigma, dtype=np.float64)
        if self.mu.ndim != 1:
            raise ValueError(f"mu must be a 1-d array [D], got shape {self.mu.shape}.")
        dim = self.mu.shape[0]
        if self.sigma.shape != (dim, dim):
            raise ValueError(f"sigma must have shape ({dim}, {dim}) to match mu, got {self.sigma.shape}.")
        if not (np.all(np.isfinite(self.mu)) and np.all(np.isfinite(self.sigma))):
            raise ValueError("mu and sigma must be finite (no NaN or inf values).")
        if self.features is not None:
            self.features = np.asarray(self.features, dtype=np.float32)
            if self.features.ndim != 2 or self.features.shape[1] != dim:
                raise ValueError(f"features must have shape [n, {dim}], got {self.features.shape}.")

    @property
    def num_features(self) -> int:
        return int(self.mu.shape[0])

    @classmethod
    def from_feature_stats(cls, stats, extractor: str, resize_mode: str, store_features: bool = False,
                           **meta) -> "ReferenceStats":
        """Build from a :class:`fastgen.metrics.fid.FeatureStats` accumulator."""
        features = stats.features.numpy() if store_features and stats.keep_features else None
        return cls(stats.mu, stats.sigma, n=stats.n, extractor=extractor, resize_mode=resize_mode,
                   features=features, meta={k: str(v) for k, v in meta.items()})

    def save(self, path: str | os.PathLike) -> Path:
        """Write a ``.npz`` (uncompressed, like EDM): ``mu``, ``sigma``, ``n``, ``extractor``, ``resize_mode``."""
        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"reference statistics path must end in .npz, got {str(path)!r}.")
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"mu": self.mu, "sigma": self.sigma, "n": np.int64(self.n), "extractor": np.str_(self.extractor),
                  "resize_mode": np.str_(self.resize_mode)}
        if self.features is not None:
            arrays["features"] = self.features
        for key, value in self.meta.items():
            if key in arrays:
                raise ValueError(f"metadata key {key!r} clashes with a reserved key.")
            arrays[key] = np.str_(value)
        with open(path, "wb") as f:
            np.savez(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ReferenceStats":
        """Read fastgen, pytorch-fid, clean-fid or EDM files (``mu``/``sigma``; also lucidrains' ``m2``/``s2``)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"reference statistics file {str(path)!r} does not exist.")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except ValueError as err:
            raise ValueError(f"{path} is not a plain .npz of arrays (pickled objects are refused): {err}") from err
        except Exception as err:  # zip errors, truncated files
            raise ValueError(f"could not read reference statistics {path}: {err}") from err
        if "mu" in arrays and "sigma" in arrays:
            mu, sigma = arrays.pop("mu"), arrays.pop("sigma")
        elif "m2" in arrays and "s2" in arrays:  # lucidrains/denoising-diffusion-pytorch
            mu, sigma = arrays.pop("m2"), arrays.pop("s2")
        else:
            raise ValueError(f"{path} has no 'mu' and 'sigma' arrays (keys: {sorted(arrays)}); expected reference "
                             f"statistics written by fastgen, pytorch-fid, clean-fid or EDM.")
        features = arrays.pop("features", arrays.pop("feats", None))
        n = int(arrays.pop("n")) if "n" in arrays else (len(features) if features is not None else 0)
        extractor = str(arrays.pop("extractor", "unknown"))
        resize_mode = str(arrays.pop("resize_mode", "unknown"))
        meta = {k: str(v) for k, v in arrays.items() if v.ndim == 0}
        try:
            return cls(mu, sigma, n=n, extractor=extractor, resize_mode=resize_mode, features=features, meta=meta)
        except ValueError as err:
            raise ValueError(f"invalid reference statistics in {path}: {err}") from err


def save_stats(path, stats: ReferenceStats) -> Path:
    """Write ``stats`` to ``path`` (see :meth:`ReferenceStats.save`)."""
    return stats.save(path)


def load_stats(path) -> ReferenceStats:
    """Read reference statistics (see :meth:`ReferenceStats.load`)."""
    return ReferenceStats.load(path)


def builtin_reference_path(name: str = "digits") -> Path:
    """Path of the shipped reference statistics ``builtin:<name>`` (the one place that knows where they live).

    ``builtin:digits`` is the 64-d digits-feature statistics of the built-in digits ``train`` split (1,000
    images, raw features included). Looked up in the package assets first (``fastgen/assets/<file>`` or any
    ``fastgen/assets/**/<file>``, which a wheel installs), then in a source checkout's ``eval/`` folder.
    """
    if name not in BUILTIN_REFERENCES:
        raise ValueError(f"builtin reference must be one of {[f'builtin:{k}' for k in BUILTIN_REFERENCES]}, "
                         f"got 'builtin:{name}'.")
    file = BUILTIN_REFERENCES[name]
    assets = _PACKAGE / "assets"
    candidates = [assets / file, *sorted(assets.rglob(file)), _PACKAGE.parent / "eval" / file]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"the shipped reference statistics {file!r} (builtin:{name}) were not found in {assets} "
                            f"nor in {_PACKAGE.parent / 'eval'}; reinstall fastgen or compute them with "
                            f"`fastgen eval ref --data builtin:{name} --out {file}`.")
