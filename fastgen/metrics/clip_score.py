"""CLIPScore (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image Captioning",
https://arxiv.org/abs/2104.08718) on torchmetrics, working with transformers 5.

``CLIPScore(I, C) = max(100 cos(E_I, E_C), 0)``, averaged over image-caption pairs. torchmetrics'
``CLIPScore`` calls ``model.get_image_features`` / ``get_text_features`` and expects tensors, but in
transformers 5 they return ``BaseModelOutputWithPooling`` (the projected embedding is
``.pooler_output``), which crashes torchmetrics. :class:`CLIPModelForScore` is a thin ``CLIPModel``
subclass that returns the tensors again, and it is handed to torchmetrics through the callable form of
``model_name_or_path`` (which also lets local folders work, not only the literal hub ids).
"""
from __future__ import annotations

import functools
import os

import torch

__all__ = ["CLIPModelForScore", "clip_score_metric", "clip_score"]


def _pooled(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@functools.lru_cache(maxsize=None)
def _model_class():
    from transformers import CLIPModel

    class CLIPModelForScore(CLIPModel):
        """``CLIPModel`` whose feature methods return the projected embeddings as tensors (transformers 4 style)."""

        def get_image_features(self, *args, **kwargs) -> torch.Tensor:
            return _pooled(super().get_image_features(*args, **kwargs))

        def get_text_features(self, *args, **kwargs) -> torch.Tensor:
            return _pooled(super().get_text_features(*args, **kwargs))

    return CLIPModelForScore


def __getattr__(name: str):
    if name == "CLIPModelForScore":  # built lazily so importing this module does not import transformers
        return _model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _load(model_name_or_path: str | os.PathLike, device):
    import transformers

    cls = _model_class()
    path = str(model_name_or_path)
    try:
        model = cls.from_pretrained(path).to(device).eval()
        processor = transformers.CLIPProcessor.from_pretrained(path)
    except OSError as err:
        raise FileNotFoundError(f"model_name_or_path {path!r} is not a CLIP folder (model + processor files) or a "
                                f"cached hub id: {err}") from err
    return model, processor


def clip_score_metric(model_name_or_path: str | os.PathLike, device: str | torch.device = "cpu", **kwargs):
    """torchmetrics ``CLIPScore`` backed by :class:`CLIPModelForScore` loaded from a folder or hub id.

    Images passed to ``update`` must be uint8 ``[N, 3, H, W]`` (or use :func:`clip_score`, which
    converts [0, 1] floats).
    """
    from torchmetrics.multimodal.clip_score import CLIPScore

    return CLIPScore(model_name_or_path=lambda: _load(model_name_or_path, device), **kwargs)


def clip_score(images: torch.Tensor, captions: list[str], model_name_or_path=None, metric=None,
               batch_size: int = 64) -> float:
    """Mean CLIPScore of images ``[N, C, H, W]`` in [0, 1] (or uint8) against ``captions``.

    Pass either ``model_name_or_path`` or an existing ``metric`` from :func:`clip_score_metric`.
    """
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError("images must be a tensor [N, 1 or 3, H, W] in [0, 1] or uint8.")
    if len(captions) != images.shape[0]:
        raise ValueError(f"captions must have one entry per image ({images.shape[0]}), got {len(captions)}.")
    if metric is None:
        if model_name_or_path is None:
            raise ValueError("clip_score needs model_name_or_path (a CLIP folder or hub id) or a metric.")
        metric = clip_score_metric(model_name_or_path)
    if images.dtype != torch.uint8:
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or infinite values.")
        images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    for start in range(0, images.shape[0], batch_size):
        metric.update(images[start:start + batch_size], list(captions[start:start + batch_size]))
    return float(metric.compute())
