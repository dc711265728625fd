"""Digits feature network: the FID feature space of the built-in digits domain.

``DigitsFeatureNet`` is a small CNN classifier for 16x16 grey-scale digits, trained by
``scripts/train_digits_features.py`` on the ``"features"`` split of ``fastgen.datasets`` only, so
it never saw the images that FID compares against. Its 64-d penultimate activations play the role
that Inception pool features play for ImageNet FID (or LeNet features for MNIST FID).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class DigitsFeatureNet(nn.Module):
    """Small CNN: conv 32 -> conv 64 -> pool -> conv 64 -> pool -> fc ``num_features`` -> 10 logits.

    Inputs must be float images in [-1, 1] (the range of ``load_digits_images`` and of diffusion
    samples); images in [0, 1] are not detected and give wrong features. Any spatial size is
    accepted (resized bilinearly to 16x16) and 3-channel inputs are averaged to one channel.
    """

    def __init__(self, num_features: int = 64, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.config = {"num_features": int(num_features), "num_classes": int(num_classes), "width": int(width)}
        self.num_features = int(num_features)
        self.num_classes = int(num_classes)
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * 4 * 4, num_features)
        self.head = nn.Linear(num_features, num_classes)
        self.dropout = nn.Dropout(0.3)

    @staticmethod
    def preprocess(x: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` (C = 1 or 3) in [-1, 1] -> ``[N, 1, 16, 16]`` float."""
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] not in (1, 3):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"images must be a tensor of shape [N, 1 or 3, H, W] in [-1, 1], got {shape}.")
        x = x.float()
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        if x.shape[-2:] != (16, 16):
            x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations ``[N, num_features]`` (float32): the FID feature space."""
        x = self.preprocess(x).to(self.fc.weight.device)
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 8x8
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)  # 4x4
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[N, num_classes]``."""
        return self.head(self.dropout(self.features(x)))

    @torch.no_grad()
    def classify(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Predicted labels (int64 ``[N]``) for images in [-1, 1]; runs in eval mode, in batches."""
        was_training = self.training
        self.eval()
        try:
            out = [self(images[i : i + batch_size]).argmax(dim=1).cpu() for i in range(0, images.shape[0], batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long)

    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` to ``save_directory``."""
        from safetensors.torch import save_file

        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps({"_class_name": type(self).__name__, **self.config}, indent=2) + "\n")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(path / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "DigitsFeatureNet":
        """Load a network written by :meth:`save_pretrained` (safetensors, no pickle); returns it in eval mode."""
        from safetensors.torch import load_file

        path = Path(directory)
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{path} must contain {CONFIG_NAME} and {WEIGHTS_NAME} (written by save_pretrained).")
        config = json.loads((path / CONFIG_NAME).read_text())
        config = {k: config[k] for k in ("num_features", "num_classes", "width") if k in config}
        model = cls(**config)
        try:
            model.load_state_dict(load_file(str(path / WEIGHTS_NAME)))
        except Exception as err:  # corrupt file or wrong shapes
            raise ValueError(f"could not load digits feature weights from {path / WEIGHTS_NAME}: {err}") from err
        return model.to(device).eval()


def _load_builtin_features(path: str | Path, **kwargs) -> DigitsFeatureNet:
    """Loader used by ``fastgen.load_builtin("digits-features")``: the network in eval mode."""
    return DigitsFeatureNet.from_pretrained(path, **kwargs)


def load_digits_feature_net(device: str | torch.device = "cpu") -> DigitsFeatureNet:
    """The built-in digits feature network (``fastgen/assets/digits-features``) in eval mode."""
    from fastgen.builtin import builtin_path

    return _load_builtin_features(builtin_path("digits-features"), device=device)
