"""Feature extractors for FID/KID/precision-recall behind one interface.

Every extractor is an ``nn.Module`` that takes float images ``[N, C, H, W]`` in **[0, 1]** (what
FastGen pipelines return with ``output_type="pt"`` and what image folders load to), returns float64
features ``[N, num_features]``, and says how it resized images (``resize_mode``), so reference
statistics record it. Available:

- ``"digits"``: the built-in digits feature network (64-d penultimate features), the FID feature
  space of the built-in digits domain; also classifies digits (``classify``).
- ``"inception"``: InceptionV3 pool features (2048-d) from torch-fidelity through torchmetrics, the
  standard FID network (Heusel et al. 2017). Needs the optional ``fastgen[inception]`` extra and the
  weights file ``weights-inception-2015-12-05-6726825d.pth`` (``inception_weights=...`` /
  ``--inception-weights``, or cached in ``$TORCH_HOME/hub/checkpoints``). Nothing here imports
  torch-fidelity or torchvision until this extractor is built.
- ``"clip"``: CLIP image embeddings from transformers (a local folder or hub id).
- any ``nn.Module`` (wrapped by :class:`ModuleExtractor`).
"""
from __future__ import annotations

import abc
import importlib.util
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["FeatureExtractor", "DigitsExtractor", "InceptionExtractor", "ClipExtractor", "ModuleExtractor",
           "get_extractor", "EXTRACTORS", "INCEPTION_WEIGHTS_NAME"]

EXTRACTORS = ("digits", "inception", "clip")
INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
# OpenAI CLIP preprocessing constants (shared by the CLIP checkpoints in transformers).
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _check_images(images: torch.Tensor, channels: tuple[int, ...] = (1, 3)) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in channels:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor [N, C, H, W] with C in {channels} and values in [0, 1], "
                         f"got {shape}.")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return images.float()


class FeatureExtractor(nn.Module, abc.ABC):
    """Base class: ``forward(images in [0, 1]) -> float64 [N, num_features]``.

    Attributes:
        name: feature space name recorded in reference statistics.
        num_features: feature width (an int, as torchmetrics' FID expects from custom modules).
        resize_mode: how inputs are resized before the network.
    """

    name: str = "custom"
    resize_mode: str = "none"
    num_features: int

    @abc.abstractmethod
    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """Features ``[N, num_features]`` of images ``[N, C, H, W]`` in [-1, 1]."""

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.extract(_check_images(images)).double()
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"extractor {self.name!r} returned features of shape {tuple(features.shape)}, expected "
                             f"[N, {self.num_features}].")
        return features

    @property
    def device(self) -> torch.device:
        param = next(self.parameters(), None)
        return param.device if param is not None else torch.device("cpu")


class DigitsExtractor(FeatureExtractor):
    """The built-in digits feature network (64-d), like LeNet features for MNIST FID.

    Images are mapped from [0, 1] to the network's [-1, 1], averaged to one channel and resized to
    16x16 with antialiased bilinear interpolation when they have another size.
    """

    name = "digits"
    resize_mode = "bilinear-antialias-16"

    def __init__(self, net=None, device: str | torch.device = "cpu"):
        super().__init__()
        if net is None:
            from .digits import load_digits_feature_net

            net = load_digits_feature_net(device=device)
        self.net = net.eval()
        self.num_features = int(net.num_features)
        self.num_classes = int(net.num_classes)

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.features(images.to(self.device) * 2 - 1)

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted digit labels ``[N]`` for images in [0, 1]."""
        return self.net.classify(_check_images(images).to(self.device) * 2 - 1)


def _inception_weights_path(weights: str | os.PathLike | None) -> Path:
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"--inception-weights / inception_weights file {str(path)!r} does not exist; give "
                                    f"the path of {INCEPTION_WEIGHTS_NAME}.")
        return path
    torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    cached = torch_home / "hub" / "checkpoints" / INCEPTION_WEIGHTS_NAME
    if cached.is_file():
        return cached
    raise FileNotFoundError(
        f"the 'inception' extractor needs the weights file {INCEPTION_WEIGHTS_NAME}: pass it with --inception-weights "
        f"PATH (inception_weights=PATH) or place it in {cached.parent}; fastgen never downloads it.")


class InceptionExtractor(FeatureExtractor):
    """InceptionV3 2048-d pool features (torch-fidelity's ``inception-v3-compat``, via torchmetrics).

    The FID network of Heusel et al. 2017 with the TF-ported weights used by pytorch-fid, torch-fidelity
    and torchmetrics. Images go in as uint8 (``round(255 x)``) and are resized to 299x299 by
    torchmetrics with antialiased bilinear interpolation; grey-scale images are repeated to RGB.
    The weights file is first checked to load with ``torch.load(weights_only=True)``, so a file that
    holds anything but tensors is refused before torch-fidelity reads it.
    """

    name = "inception"
    resize_mode = "torchmetrics-bilinear-antialias-299"

    def __init__(self, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
        super().__init__()
        if importlib.util.find_spec("torch_fidelity") is None:
            raise ValueError("the 'inception' extractor needs torch-fidelity: install the extra with "
                             "`pip install fastgen[inception]` and give the weights with --inception-weights PATH "
                             f"({INCEPTION_WEIGHTS_NAME}); or use --features digits or clip.")
        path = _inception_weights_path(weights)
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"inception weights {path} are not a plain tensor checkpoint: {err}") from err
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                      feature_extractor_weights_path=str(path)).to(device)
        self.num_features = 2048

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        return self.net((images.clamp(0, 1) * 255).round().to(torch.uint8).to(self.device))


class ClipExtractor(FeatureExtractor):
    """CLIP image embeddings (projected, before normalisation) from a transformers ``CLIPModel``.

    Preprocessing in torch: bicubic antialiased resize of the short side to the model's image size,
    centre crop, OpenAI CLIP mean/std normalisation; grey-scale images are repeated to RGB.
    """

    resize_mode = "bicubic-antialias-centercrop"

    def __init__(self, model: str | os.PathLike | nn.Module, device: str | torch.device = "cpu"):
        super().__init__()
        if isinstance(model, nn.Module):
            self.model, label = model, type(model).__name__
        else:
            from transformers import CLIPModel

            try:
                self.model = CLIPModel.from_pretrained(str(model))
            except OSError as err:
                raise FileNotFoundError(f"--clip-model {str(model)!r} is not a CLIP folder or a cached hub id: {err}") from err
            label = str(model)
        self.model = self.model.to(device).eval()
        self.name = f"clip:{label}"
        self.image_size = int(self.model.config.vision_config.image_size)
        self.num_features = int(self.model.config.projection_dim)
        self.register_buffer("mean", torch.tensor(_CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        size = self.image_size
        h, w = images.shape[-2:]
        scale = size / min(h, w)
        new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
        images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        images = images[..., top:top + size, left:left + size].clamp(0, 1)
        pixels = ((images.to(self.mean.device) - self.mean) / self.std)
        out = self.model.get_image_features(pixel_values=pixels)
        return out if isinstance(out, torch.Tensor) else out.pooler_output


class ModuleExtractor(FeatureExtractor):
    """Any ``nn.Module`` as an extractor.

    Args:
        module: maps images to ``[N, D]`` features (``[N, D, 1, 1]`` is flattened).
        input_range: ``"0,1"`` (pass images as they are) or ``"-1,1"`` (map to [-1, 1] first).
        num_features: feature width; default: ``module.num_features`` or probed with one image of
            ``probe_shape``.
        name: recorded in reference statistics.
    """

    def __init__(self, module: nn.Module, input_range: str = "0,1", num_features: int | None = None,
                 name: str | None = None, probe_shape: tuple[int, int, int] = (3, 32, 32)):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}.")
        if input_range not in ("0,1", "-1,1"):
            raise ValueError(f"input_range must be '0,1' or '-1,1', got {input_range!r}.")
        self.module = module.eval()
        self.input_range = input_range
        self.name = name or f"module:{type(module).__name__}"
        if num_features is None:
            num_features = getattr(module, "num_features", None)
        if num_features is None:
            try:
                with torch.no_grad():
                    num_features = self.extract(torch.rand(1, *probe_shape)).shape[-1]
            except Exception as err:
                raise ValueError(f"could not find the feature width of {type(module).__name__} by running one image of "
                                 f"shape {probe_shape}: {err}; pass num_features=... or probe_shape=(C, H, W), or give "
                                 f"the module an int attribute num_features.") from err
        self.num_features = int(num_features)

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device)
        if self.input_range == "-1,1":
            x = x * 2 - 1
        return self.module(x).flatten(1)


def get_extractor(spec: str | nn.Module = "digits", *, device: str | torch.device = "cpu",
                  inception_weights: str | os.PathLike | None = None,
                  clip_model: str | os.PathLike | nn.Module | None = None) -> FeatureExtractor:
    """Build a feature extractor.

    Args:
        spec: ``"digits"``, ``"inception"``, ``"clip"`` (needs ``clip_model``), ``"clip:<folder or id>"``,
            a :class:`FeatureExtractor`, or any ``nn.Module`` (wrapped by :class:`ModuleExtractor`).
        device: torch device.
        inception_weights: path of the InceptionV3 weights file (``inception`` only).
        clip_model: CLIP folder, hub id or ``CLIPModel`` (``clip`` only).
    """
    if isinstance(spec, FeatureExtractor):
        return spec.to(device)
    if isinstance(spec, nn.Module):
        return ModuleExtractor(spec).to(device)
    if not isinstance(spec, str):
        raise TypeError(f"features must be one of {list(EXTRACTORS)} or an nn.Module, got {type(spec).__name__}.")
    if spec.startswith("clip:"):
        spec, clip_model = "clip", spec.split(":", 1)[1]
    if spec == "digits":
        return DigitsExtractor(device=device)
    if spec == "inception":
        return InceptionExtractor(inception_weights, device=device)
    if spec == "clip":
        if clip_model is None:
            raise ValueError("the 'clip' extractor needs a model: pass --clip-model FOLDER_OR_HUB_ID (clip_model=...).")
        return ClipExtractor(clip_model, device=device)
    raise ValueError(f"features must be one of {list(EXTRACTORS)} (or 'clip:<model>', or an nn.Module), got {spec!r}.")
