"""Built-in digits assets: dataset split, feature network, diffusion UNet (CPU, no network)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastgen.builtin import builtin_path, load_builtin
from fastgen.datasets import digits_split_indices, load_digits_images
from fastgen.metrics import DigitsFeatureNet


def test_split_sizes_disjoint_and_deterministic():
    parts = {s: digits_split_indices(s) for s in ("features", "train", "heldout")}
    assert {s: len(v) for s, v in parts.items()} == {"features": 500, "train": 1000, "heldout": 297}
    union = np.concatenate(list(parts.values()))
    assert len(np.unique(union)) == len(union) == len(digits_split_indices("all")) == 1797
    x1, y1 = load_digits_images("heldout")
    x2, y2 = load_digits_images("heldout")
    assert torch.equal(x1, x2) and torch.equal(y1, y2)


@pytest.mark.parametrize("split", ["features", "train", "heldout", "all"])
def test_images_shape_range_dtype(split):
    x, y = load_digits_images(split, size=16)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape == (len(y), 1, 16, 16)
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x.min() == -1.0 and x.max() > 0.9  # real use of the range, not a constant image
    assert set(y.tolist()) == set(range(10))


def test_images_match_sklearn_and_bilinear_upsampling():
    """The packaged arrays (fastgen/assets/digits-data) are scikit-learn's digits, exactly."""
    load_digits = pytest.importorskip("sklearn.datasets").load_digits

    raw = load_digits()
    x8, y = load_digits_images("all", size=8)
    np.testing.assert_array_equal(x8[:, 0].numpy(), (raw.images / 8.0 - 1.0).astype(np.float32))
    np.testing.assert_array_equal(y.numpy(), raw.target)
    x16, _ = load_digits_images("all", size=16)
    ref = torch.nn.functional.interpolate(x8, size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.allclose(x16, ref)


@pytest.mark.parametrize("kwargs, name", [({"split": "test"}, "split"), ({"size": 0}, "size"), ({"size": 16.0}, "size")])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        load_digits_images(**kwargs)


def test_feature_net_round_trip(tmp_path):
    torch.manual_seed(0)
    net = DigitsFeatureNet().eval()
    net.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    loaded = DigitsFeatureNet.from_pretrained(tmp_path)
    ref_state, new_state = net.state_dict(), loaded.state_dict()
    assert ref_state.keys() == new_state.keys()
    assert all(torch.equal(ref_state[k], new_state[k]) for k in ref_state)
    x = torch.rand(5, 1, 16, 16) * 2 - 1
    assert torch.equal(net.features(x), loaded.features(x))
    assert loaded.features(x).shape == (5, loaded.num_features)
    assert loaded(x).shape == (5, 10)
    # 3-channel and other-size inputs are accepted.
    assert loaded.features(x.repeat(1, 3, 1, 1)).shape == (5, loaded.num_features)
    assert torch.allclose(loaded.features(x.repeat(1, 3, 1, 1)), loaded.features(x), atol=1e-6)
    assert loaded.features(torch.zeros(2, 1, 32, 32)).shape == (2, loaded.num_features)
    with pytest.raises(FileNotFoundError):
        DigitsFeatureNet.from_pretrained(tmp_path / "missing")


def test_builtin_feature_net_heldout_accuracy():
    net = load_builtin("digits-features")
    assert isinstance(net, DigitsFeatureNet) and not net.training
    x, y = load_digits_images("heldout")
    accuracy = (net.classify(x) == y).float().mean().item()
    assert accuracy >= 0.95, accuracy
    # The accuracy is not an artifact of the classifier: scrambled images fail.
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(0))
    scrambled = x.flatten(1)[:, perm].view_as(x)
    assert (net.classify(scrambled) == y).float().mean().item() < 0.6


def test_builtin_unet_loads_small_and_runs():
    from diffusers import DPMSolverMultistepScheduler, UNet2DModel

    folder = builtin_path("digits")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.is_file()
    assert weights.stat().st_size < 10 * 1024 * 1024
    unet = UNet2DModel.from_pretrained(folder / "unet").eval()
    assert unet.config.sample_size == 16 and unet.config.num_class_embeds == 11
    labels = torch.arange(11)
    with torch.no_grad():
        out = unet(torch.randn(11, 1, 16, 16), torch.full((11,), 500), class_labels=labels).sample
    assert out.shape == (11, 1, 16, 16) and torch.isfinite(out).all()
    sched = DPMSolverMultistepScheduler.from_pretrained(folder / "scheduler")
    assert sched.config.num_train_timesteps == 1000 and sched.config.prediction_type == "epsilon"
