"""Analytical teleportation: the exact probability-flow jump for Gaussian data.

Wang & Vastola, *The Unreasonable Effectiveness of Gaussian Score Approximation for Diffusion Models
and its Applications* (arXiv:2412.09726; authors' code ``Animadversio/GaussianTeleportationDiffusion``).
At high noise the learned score is close to that of a Gaussian fit N(mu, Sigma) of the data, whose PF-ODE
has a closed form. With ``x_t = alpha_t x0 + sigma_t eps``, ``Sigma = U diag(lam_k) U^T`` and any schedule:

    x_t = alpha_t mu + sum_k u_k u_k^T (x_T - alpha_T mu) sqrt(alpha_t^2 lam_k + sigma_t^2) / sqrt(alpha_T^2 lam_k + sigma_T^2)
          + sqrt(alpha_t^2 lam_res + sigma_t^2) / sqrt(alpha_T^2 lam_res + sigma_T^2) * P_perp (x_T - alpha_T mu)

(each eigen-coordinate of ``x - alpha mu`` scales with the marginal standard deviation; ``lam_res`` is
the isotropic variance left outside span(U), 0 for a full or rank-deficient fit). It holds for VP
(alpha^2 + sigma^2 = 1), VE/EDM (alpha = 1) and rectified-flow (alpha = 1 - t, sigma = t) schedules alike.

Use it in a FastGen pipeline as ``pipe(..., teleport=stats, teleport_fraction=0.2)``: the first 20% of
the steps are replaced by the jump (zero network evaluations) and the solver continues from there.

Class-conditional models (paper §5 notes that conditional models need class-wise statistics) use
:class:`ClassGaussianStats`: one Gaussian per class plus the unconditional one. Without guidance each
row jumps with the closed form of its class. With classifier-free guidance of scale w the sampler
follows the *guided* ODE, whose denoiser ``D_u + w (D_c - D_u)`` is still linear in x for Gaussians but
mixes two eigenbases, so there is no closed form; it is integrated numerically (RK4 in lambda on the
variance-exploding state ``x / alpha``, no network calls). This guided jump is our extension, not in
the paper.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
import numpy as np
import torch

STATS_FORMATS = (".safetensors", ".npz")


class GaussianStats:
    """Mean and (possibly low-rank) covariance eigendecomposition of data in the model's input space.

    Args:
        mean: ``[*shape]`` data mean.
        eigenvalues: ``[r]`` covariance eigenvalues (clamped to >= 0).
        eigenvectors: ``[D, r]`` orthonormal columns, ``D = prod(shape)``.
        residual_variance: isotropic variance of the directions outside span(eigenvectors)
            (0: a full or rank-deficient covariance).

    Instances are callables with the teleport hook signature of fastgen's sampling loop, so
    ``teleport=stats`` works in every FastGen pipeline.
    """

    def __init__(self, mean: torch.Tensor, eigenvalues: torch.Tensor, eigenvectors: torch.Tensor,
                 residual_variance: float = 0.0):
        mean = torch.as_tensor(mean, dtype=torch.float64)
        eigenvalues = torch.as_tensor(eigenvalues, dtype=torch.float64).reshape(-1)
        eigenvectors = torch.as_tensor(eigenvectors, dtype=torch.float64)
        d = mean.numel()
        if eigenvectors.ndim != 2 or eigenvectors.shape[0] != d or eigenvectors.shape[1] != eigenvalues.numel():
            raise ValueError(f"eigenvectors must have shape [{d}, {eigenvalues.numel()}] (one column per eigenvalue), "
                             f"got {list(eigenvectors.shape)}.")
        if not (torch.isfinite(mean).all() and torch.isfinite(eigenvalues).all() and torch.isfinite(eigenvectors).all()):
            raise ValueError("mean, eigenvalues and eigenvectors must be finite.")
        if residual_variance < 0 or not np.isfinite(residual_variance):
            raise ValueError(f"residual_variance must be a finite number >= 0, got {residual_variance}.")
        self.mean = mean
        self.eigenvalues = eigenvalues.clamp(min=0.0)  # noisy covariances give tiny negative eigenvalues
        self.eigenvectors = eigenvectors
        self.residual_variance = float(residual_variance)

    # ------------------------------------------------------------------ facts
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.mean.shape)

    @property
    def dim(self) -> int:
        return self.mean.numel()

    @property
    def rank(self) -> int:
        return self.eigenvalues.numel()

    @property
    def total_variance(self) -> float:
        return float(self.eigenvalues.sum()) + self.residual_variance * (self.dim - self.rank)

    def __repr__(self) -> str:
        return (f"GaussianStats(shape={self.shape}, rank={self.rank}, residual_variance={self.residual_variance:.3g}, "
                f"total_variance={self.total_variance:.4g})")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_samples(cls, samples: torch.Tensor, *, rank: int | None = None, explained_variance: float = 0.999,
                     max_full_dim: int = 4096) -> "GaussianStats":
        """Fit N(mu, Sigma) to ``samples`` ``[N, *shape]`` (data or model samples, in model space).

        Up to ``max_full_dim`` dimensions the covariance is eigendecomposed in full. Above, a top-r PCA
        (SVD of the centred samples) keeps the smallest rank reaching ``explained_variance`` of the total
        (or ``rank`` when given), and the remaining variance is spread isotropically over the complement.
        """
        if not isinstance(samples, torch.Tensor) or samples.ndim < 2 or samples.shape[0] < 2:
            raise ValueError("samples must be a tensor [N, ...] with at least 2 samples.")
        if not 0.0 < explained_variance <= 1.0:
            raise ValueError(f"explained_variance must be in (0, 1], got {explained_variance}.")
        x = samples.detach().to(torch.float64).reshape(samples.shape[0], -1)
        n, d = x.shape
        mean = x.mean(0)
        xc = x - mean
        total = float((xc**2).sum() / (n - 1))
        if d <= max_full_dim and rank is None:
            cov = xc.T @ xc / (n - 1)
            evals, evecs = torch.linalg.eigh(cov)
            order = evals.argsort(descending=True)
            return cls(mean.reshape(samples.shape[1:]), evals[order], evecs[:, order])
        _, s, vh = torch.linalg.svd(xc, full_matrices=False)
        evals = s**2 / (n - 1)
        if rank is None:
            frac = torch.cumsum(evals, 0) / max(total, 1e-300)
            rank = int((frac < explained_variance).sum()) + 1
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(n, d):
            raise ValueError(f"rank must be an integer in [1, {min(n, d)}], got {rank!r}.")
        kept = evals[:rank]
        residual = max(total - float(kept.sum()), 0.0) / max(d - rank, 1)
        return cls(mean.reshape(samples.shape[1:]), kept, vh[:rank].T, residual_variance=residual)

    # ------------------------------------------------------------------ save / load (no pickles)
    def save(self, path: str | os.PathLike) -> None:
        """Save as ``.safetensors`` or ``.npz`` (float64 tensors plus shape and residual variance)."""
        path = Path(path)
        tensors = {"mean": self.mean.contiguous(), "eigenvalues": self.eigenvalues.contiguous(),
                   "eigenvectors": self.eigenvectors.contiguous(),
                   "residual_variance": torch.tensor([self.residual_variance], dtype=torch.float64)}
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file
            save_file(tensors, str(path), metadata={"format": "fastgen.gaussian_stats/1", "shape": json.dumps(self.shape)})
        elif path.suffix == ".npz":
            np.savez(path, **{k: v.numpy() for k, v in tensors.items()})
        else:
            raise ValueError(f"path must end in one of {STATS_FORMATS}, got {str(path)!r}.")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GaussianStats":
        """Load statistics saved by :meth:`save` (safetensors, or npz read with ``allow_pickle=False``)."""
        path = Path(path)
        if path.suffix not in STATS_FORMATS:
            raise ValueError(f"teleport statistics must be a {' or '.join(STATS_FORMATS)} file, got {str(path)!r}.")
        if not path.is_file():
            raise FileNotFoundError(f"teleport statistics file {str(path)!r} does not exist.")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file
                data = load_file(str(path))
            else:
                import zipfile

                if not zipfile.is_zipfile(path):
                    raise ValueError("not an .npz archive (not a zip file; truncated or another format)")
                with np.load(path, allow_pickle=False) as f:
                    data = {k: torch.from_numpy(f[k]) for k in f.files}
        except Exception as err:  # corrupt file: one clear message
            raise ValueError(f"teleport statistics file {str(path)!r} could not be read: {err}") from None
        missing = [k for k in ("mean", "eigenvalues", "eigenvectors") if k not in data]
        if missing:
            raise ValueError(f"teleport statistics file {str(path)!r} lacks {missing}.")
        try:
            residual = float(data["residual_variance"].reshape(-1)[0]) if "residual_variance" in data else 0.0
            return cls(data["mean"], data["eigenvalues"], data["eigenvectors"], residual)
        except (ValueError, RuntimeError, IndexError) as err:
            raise ValueError(f"teleport statistics file {str(path)!r} is invalid: {err}") from None

    def scaled(self, scale: float, shift: float = 0.0) -> "GaussianStats":
        """Statistics of ``scale * x + shift`` (e.g. ``scale=2, shift=-1`` maps [0, 1] images to [-1, 1])."""
        return GaussianStats(self.mean * scale + shift, self.eigenvalues * scale**2, self.eigenvectors,
                             self.residual_variance * scale**2)

    # ------------------------------------------------------------------ the jump
    def __call__(self, x: torch.Tensor, *, alpha_from: float, sigma_from: float, alpha_to: float,
                 sigma_to: float) -> torch.Tensor:
        return teleport(x, self, alpha_from=alpha_from, sigma_from=sigma_from, alpha_to=alpha_to, sigma_to=sigma_to)


def teleport(x: torch.Tensor, stats: GaussianStats, *, alpha_from: float, sigma_from: float, alpha_to: float,
             sigma_to: float) -> torch.Tensor:
    """Exact PF-ODE solution for data N(mu, Sigma) from ``(alpha_from, sigma_from)`` to ``(alpha_to, sigma_to)``.

    ``x`` is ``[B, *stats.shape]`` (VP-form state ``alpha x0 + sigma eps``); computed in float64 and
    returned in ``x``'s dtype. Wang & Vastola 2024, eq. for the Gaussian PF-ODE flow (see module doc).
    """
    if tuple(x.shape[1:]) != stats.shape:
        raise ValueError(f"x must have shape [batch, {', '.join(map(str, stats.shape))}] to match the statistics, "
                         f"got {list(x.shape)}.")
    a0, s0, a1, s1 = (float(v) for v in (alpha_from, sigma_from, alpha_to, sigma_to))
    if min(a0, a1) < 0 or min(s0, s1) < 0 or a0**2 + s0**2 == 0:
        raise ValueError("alpha_from/sigma_from/alpha_to/sigma_to must be >= 0 with a nonzero start.")
    mu = stats.mean.reshape(-1).to(x.device)
    u = stats.eigenvectors.to(x.device)
    lam = stats.eigenvalues.to(x.device)
    dev = x.detach().to(torch.float64).reshape(x.shape[0], -1) - a0 * mu
    coeff = dev @ u  # [B, r]: eigen-coordinates of x - alpha mu
    ratio = torch.sqrt((a1**2 * lam + s1**2) / (a0**2 * lam + s0**2))
    lr = stats.residual_variance
    ratio_perp = ((a1**2 * lr + s1**2) / (a0**2 * lr + s0**2)) ** 0.5
    out = a1 * mu + (coeff * ratio) @ u.T + ratio_perp * (dev - coeff @ u.T)
    return out.reshape(x.shape).to(x.dtype)


def _gaussian_denoiser(z: torch.Tensor, stats: GaussianStats, s: float) -> torch.Tensor:
    """E[x0 | z] for data N(mu, Sigma) and the variance-exploding state ``z = x0 + s eps`` (rows of ``z`` flat)."""
    mu, u, lam = stats.mean.reshape(-1), stats.eigenvectors, stats.eigenvalues
    dev = z - mu
    c = dev @ u
    lr = stats.residual_variance
    return mu + (c * (lam / (lam + s * s))) @ u.T + (lr / (lr + s * s)) * (dev - c @ u.T)


def guided_teleport(x: torch.Tensor, cond: GaussianStats, uncond: GaussianStats, guidance_scale: float, *,
                    alpha_from: float, sigma_from: float, alpha_to: float, sigma_to: float,
                    steps: int = 128) -> torch.Tensor:
    """Solve the CFG-guided PF-ODE for Gaussian class and unconditional data from one noise level to another.

    In the variance-exploding state ``z = x / alpha`` with ``lambda = log(alpha / sigma)`` every schedule
    shares the ODE ``dz/dlambda = D_w(z, lambda) - z``, ``D_w = D_u + w (D_c - D_u)`` (x0-space CFG,
    which equals eps-space CFG). With ``y = e^lambda z = x / sigma`` the decay is exact,
    ``dy/dlambda = e^lambda D_w``, and that linear ODE is integrated with ``steps`` RK4 steps uniform in
    lambda, in float64. No network evaluations.
    """
    a0, s0, a1, s1 = (float(v) for v in (alpha_from, sigma_from, alpha_to, sigma_to))
    if min(a0, a1) <= 0 or min(s0, s1) <= 0:
        raise ValueError("guided_teleport needs alpha > 0 and sigma > 0 at both ends (a noisy target).")
    lam0, lam1 = float(np.log(a0 / s0)), float(np.log(a1 / s1))
    # y = e^lambda z = x / sigma obeys dy/dlambda = e^lambda D_w(e^-lambda y): the -z decay is exact
    y = x.detach().to(torch.float64).reshape(x.shape[0], -1) / s0
    w = float(guidance_scale)

    def f(yy, lam):
        s = float(np.exp(-lam))
        zz = yy * s
        d = _gaussian_denoiser(zz, uncond, s)
        if w != 0.0:
            d = d + w * (_gaussian_denoiser(zz, cond, s) - d)
        return d / s

    h = (lam1 - lam0) / steps
    lam = lam0
    for _ in range(steps):
        k1 = f(y, lam)
        k2 = f(y + 0.5 * h * k1, lam + 0.5 * h)
        k3 = f(y + 0.5 * h * k2, lam + 0.5 * h)
        k4 = f(y + h * k3, lam + h)
        y = y + (h / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)
        lam += h
    return (s1 * y).reshape(x.shape).to(x.dtype)


class ClassGaussianStats:
    """One Gaussian fit per class plus the unconditional fit, for class-conditional models.

    Args:
        classes: ``{label: GaussianStats}`` in the model's input space.
        unconditional: the fit to all data (what the null label models); needed for guidance and for
            labels without their own statistics.

    ``pipe(..., teleport=class_stats)`` in :class:`~fastgen.FastGenClassPipeline` binds the call's labels
    and guidance scale (:meth:`for_labels`): guidance scale 1 (or none) uses each class's closed form,
    other scales the guided jump (:func:`guided_teleport`).
    """

    def __init__(self, classes: dict[int, GaussianStats], unconditional: GaussianStats | None = None):
        if not classes or not all(isinstance(v, GaussianStats) for v in classes.values()):
            raise ValueError("classes must map labels to GaussianStats (at least one).")
        shapes = {v.shape for v in classes.values()} | ({unconditional.shape} if unconditional is not None else set())
        if len(shapes) != 1:
            raise ValueError(f"all statistics must have the same shape, got {sorted(shapes)}.")
        self.classes = {int(k): v for k, v in classes.items()}
        self.unconditional = unconditional

    @property
    def shape(self) -> tuple[int, ...]:
        return next(iter(self.classes.values())).shape

    def __repr__(self) -> str:
        return (f"ClassGaussianStats(classes={sorted(self.classes)}, shape={self.shape}, "
                f"unconditional={'yes' if self.unconditional is not None else 'no'})")

    @classmethod
    def from_samples(cls, samples: torch.Tensor, labels, **kwargs) -> "ClassGaussianStats":
        """Per-class fits (``GaussianStats.from_samples`` keyword arguments) and the unconditional fit."""
        labels = torch.as_tensor(labels).reshape(-1)
        if labels.shape[0] != samples.shape[0]:
            raise ValueError(f"labels must have one entry per sample ({samples.shape[0]}), got {labels.shape[0]}.")
        classes = {int(c): GaussianStats.from_samples(samples[labels == c], **kwargs) for c in labels.unique().tolist()}
        return cls(classes, GaussianStats.from_samples(samples, **kwargs))

    def save(self, path: str | os.PathLike) -> None:
        """Save as ``.safetensors`` (keys ``<label>.mean`` ..., ``uncond.mean`` ...)."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"class statistics are saved as .safetensors, got {str(path)!r}.")
        from safetensors.torch import save_file
        tensors = {}
        items = [(str(k), v) for k, v in self.classes.items()]
        if self.unconditional is not None:
            items.append(("uncond", self.unconditional))
        for name, st in items:
            tensors.update({f"{name}.mean": st.mean.contiguous(), f"{name}.eigenvalues": st.eigenvalues.contiguous(),
                            f"{name}.eigenvectors": st.eigenvectors.contiguous(),
                            f"{name}.residual_variance": torch.tensor([st.residual_variance], dtype=torch.float64)})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "fastgen.class_gaussian_stats/1", "shape": json.dumps(self.shape)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ClassGaussianStats":
        """Load statistics saved by :meth:`save`: FileNotFoundError for a missing file, ValueError naming
        the file for a corrupt one or one that holds a single :class:`GaussianStats`."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"class statistics must be a .safetensors file, got {str(path)!r}.")
        if not path.is_file():
            raise FileNotFoundError(f"class statistics file {str(path)!r} does not exist.")
        from safetensors import safe_open
        from safetensors.torch import load_file
        try:
            with safe_open(str(path), "pt") as f:
                fmt = (f.metadata() or {}).get("format")
        except Exception as err:  # corrupt file: one clear message
            raise ValueError(f"class statistics file {str(path)!r} could not be read: {err}") from None
        if fmt != "fastgen.class_gaussian_stats/1":
            raise ValueError(f"{str(path)!r} is not a class statistics file (format {fmt!r}); load it with GaussianStats.load.")
        try:
            data = load_file(str(path))
            groups: dict[str, dict] = {}
            for key, value in data.items():
                name, field_ = key.split(".", 1)
                groups.setdefault(name, {})[field_] = value
            build = lambda g: GaussianStats(g["mean"], g["eigenvalues"], g["eigenvectors"],  # noqa: E731
                                            float(g["residual_variance"].reshape(-1)[0]))
            uncond = build(groups.pop("uncond")) if "uncond" in groups else None
            return cls({int(k): build(g) for k, g in groups.items()}, uncond)
        except (KeyError, ValueError, RuntimeError) as err:
            raise ValueError(f"class statistics file {str(path)!r} is malformed: {err}") from None

    def __call__(self, x, **kwargs):
        raise ValueError("ClassGaussianStats needs the class labels of the batch: use it with FastGenClassPipeline, "
                         "or bind them with stats.for_labels(labels, guidance_scale).")

    def for_labels(self, labels, guidance_scale: float = 1.0):
        """The teleport hook for a batch with these class labels (one per row) and CFG scale."""
        labels = [int(v) for v in torch.as_tensor(labels).reshape(-1).tolist()]
        missing = sorted({c for c in labels if c not in self.classes})
        if missing and self.unconditional is None:
            raise ValueError(f"no teleport statistics for labels {missing} (have {sorted(self.classes)}) and no unconditional fit.")
        guided = float(guidance_scale) != 1.0
        if guided and self.unconditional is None:
            raise ValueError("guided teleport (guidance_scale != 1) needs the unconditional statistics.")

        def jump(x, *, alpha_from, sigma_from, alpha_to, sigma_to):
            if len(labels) != x.shape[0]:
                raise ValueError(f"teleport bound to {len(labels)} labels got a batch of {x.shape[0]}.")
            out = torch.empty_like(x)
            for c in sorted(set(labels)):
                rows = torch.tensor([i for i, v in enumerate(labels) if v == c], device=x.device)
                st = self.classes.get(c, self.unconditional)
                kw = dict(alpha_from=alpha_from, sigma_from=sigma_from, alpha_to=alpha_to, sigma_to=sigma_to)
                if guided and c in self.classes:
                    out[rows] = guided_teleport(x[rows], st, self.unconditional, guidance_scale, **kw)
                else:
                    out[rows] = teleport(x[rows], st, **kw)
            return out
        return jump


def _is_class_stats_file(path: Path) -> bool:
    """Whether a readable ``.safetensors`` file says it holds :class:`ClassGaussianStats` (a corrupt one is
    left to ``GaussianStats.load``, which names it in its error)."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("format") == "fastgen.class_gaussian_stats/1"
    except Exception:
        return False


def resolve_teleport(teleport):
    """``None``, a callable (``GaussianStats`` and ``ClassGaussianStats`` included) or a path to saved
    statistics -> ``None`` or a callable."""
    if teleport is None or callable(teleport):
        return teleport
    if isinstance(teleport, (str, os.PathLike)):
        path = Path(teleport)
        if path.suffix == ".safetensors" and path.is_file() and _is_class_stats_file(path):
            return ClassGaussianStats.load(path)
        return GaussianStats.load(teleport)
    raise ValueError("teleport must be None, a GaussianStats or ClassGaussianStats, a path to saved statistics (.safetensors/.npz) or a "
                     f"callable fn(x, *, alpha_from, sigma_from, alpha_to, sigma_to) -> x; got {type(teleport).__name__}.")


__all__ = ["GaussianStats", "ClassGaussianStats", "teleport", "guided_teleport", "resolve_teleport", "STATS_FORMATS"]
