"""Fit and save Gaussian statistics for analytical teleportation (``fastgen teleport-stats``; also from Python).

Wang & Vastola, *The Unreasonable Effectiveness of Gaussian Score Approximation for Diffusion Models and its
Applications* (TMLR 2024, arXiv:2311.10892): N(mu, Sigma) of the data (or of a model's samples), in the
model's input space, is what :func:`fastgen.teleport.teleport` jumps with.
"""
from __future__ import annotations

from dataclasses import dataclass, field

SOURCES = ("data", "model")
SAMPLE_BATCH = 250


@dataclass
class TeleportStatsConfig:
    """Options of :func:`fit_teleport_stats` (and of ``fastgen teleport-stats``)."""

    out: str = field(metadata={"help": "output file (.safetensors or .npz)"})
    source: str = field(default="data", metadata={
        "help": "'data': the built-in digits training split; 'model': samples of --model"})
    model: str = field(default="builtin:digits", metadata={"help": "model for source 'model'"})
    samples: int = field(default=1000, metadata={"help": "model samples for source 'model'"})
    steps: int = field(default=20, metadata={"help": "solver steps for source 'model'"})
    explained_variance: float = field(default=0.999, metadata={
        "help": "variance kept by the low-rank fit (used above max_full_dim dimensions)"})
    max_full_dim: int = field(default=4096, metadata={"help": "largest dimension with a full eigendecomposition"})
    per_class: bool = field(default=False, metadata={
        "help": "one fit per class plus the unconditional fit (ClassGaussianStats, .safetensors): the class "
                "pipeline then jumps each row with its class and follows the guided ODE under CFG"})
    device: str = field(default="cpu", metadata={"help": "torch device for source 'model'"})


def _check(config: TeleportStatsConfig) -> None:
    from .generate import check_output_path
    from .teleport import STATS_FORMATS

    check_output_path(config.out, STATS_FORMATS, name="out")
    if config.per_class and not str(config.out).endswith(".safetensors"):
        raise ValueError(f"per_class statistics are saved as .safetensors, got out {config.out!r}.")
    if config.source not in SOURCES:
        raise ValueError(f"source must be one of {list(SOURCES)}, got {config.source!r}.")
    if config.source == "data" and config.model != "builtin:digits":
        raise ValueError("source 'data' is the built-in digits training split; use source 'model' for a model.")
    if isinstance(config.samples, bool) or not isinstance(config.samples, int) or config.samples <= 1:
        raise ValueError(f"samples must be an integer > 1, got {config.samples!r}.")
    from .pipelines.common import check_positive_int

    check_positive_int("steps", config.steps)
    if not 0 < config.explained_variance <= 1:
        raise ValueError(f"explained_variance must be in (0, 1], got {config.explained_variance}.")


def model_samples(model: str, num_samples: int, steps: int, device: str = "cpu"):
    """``(x, labels)``: ``num_samples`` samples of a class-conditional ``model`` in its input space (latents for
    latent models), class ``i % num_classes`` and seed ``i`` for sample ``i``."""
    import torch

    from .builtin import load_pipeline

    pipe = load_pipeline(model, device=device)
    pipe.set_progress_bar_config(disable=True)
    if not hasattr(pipe, "num_classes"):
        raise ValueError(f"model {model!r} is not class-conditional; teleport statistics from samples need one.")
    labels = [i % pipe.num_classes for i in range(num_samples)]
    chunks = []
    for start in range(0, num_samples, SAMPLE_BATCH):
        lab = labels[start:start + SAMPLE_BATCH]
        with torch.no_grad():
            chunks.append(pipe(class_labels=lab, num_inference_steps=steps, seed=list(range(start, start + len(lab))),
                               output_type="latent").images.cpu())
    return torch.cat(chunks), torch.tensor(labels)


def fit_teleport_stats(config: TeleportStatsConfig | None = None, **overrides) -> dict:
    """Fit the statistics of ``config`` and save them to ``config.out``; returns a record."""
    config = TeleportStatsConfig(**overrides) if config is None else config
    _check(config)
    from .teleport import ClassGaussianStats, GaussianStats

    if config.source == "data":
        from .datasets import load_digits_images

        x, y = load_digits_images("train")  # images in [-1, 1], labels
        x = x.float()
    else:
        x, y = model_samples(config.model, config.samples, config.steps, config.device)
    record = {"out": str(config.out), "source": config.source, "samples": int(x.shape[0])}
    if config.per_class:
        # a class has ~N/C samples: a full covariance would be rank-deficient, so always fit low-rank + isotropic
        stats = ClassGaussianStats.from_samples(x, y, explained_variance=config.explained_variance, max_full_dim=0)
        record.update(shape=list(stats.shape), classes=len(stats.classes),
                      ranks={k: v.rank for k, v in stats.classes.items()})
    else:
        stats = GaussianStats.from_samples(x, explained_variance=config.explained_variance,
                                           max_full_dim=config.max_full_dim)
        record.update(shape=list(stats.shape), rank=stats.rank, residual_variance=stats.residual_variance,
                      total_variance=stats.total_variance)
    stats.save(config.out)
    record["summary"] = str(stats)
    return record


__all__ = ["TeleportStatsConfig", "fit_teleport_stats", "model_samples"]
