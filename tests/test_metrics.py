"""Evaluation metrics: FID against scipy and torchmetrics, reference statistics, CLIPScore on a tiny CLIP,
precision/recall and saturation closed forms, robustness errors, and 2-process accelerate evaluation."""
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import DPMSolverMultistepScheduler  # noqa: E402

from fastgen import FastGenClassPipeline  # noqa: E402
from fastgen.cli import main  # noqa: E402
from fastgen.metrics import (FeatureStats, ReferenceStats, clipped_fraction, fid_from_features,  # noqa: E402
                             frechet_distance, get_extractor, mean_abs_intensity, mean_saturation, precision_recall)
from fastgen.metrics.features import ModuleExtractor  # noqa: E402
from fastgen.metrics.fid import kernel_inception_distance, torchmetrics_fid  # noqa: E402
from tiny import tiny_class_unet, write_clip_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The machine is shared: one thread is faster than two contended ones for these small models."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _random_stats(rng, dim):
    a = rng.standard_normal((dim, 3 * dim))
    b = rng.standard_normal((dim, 3 * dim)) * 0.5 + 0.1 * a
    return rng.standard_normal(dim), a @ a.T / dim, rng.standard_normal(dim) * 0.3, b @ b.T / dim + 0.01 * np.eye(dim)


def _scipy_fid(mu1, s1, mu2, s2):
    from scipy import linalg

    covmean = linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# ----------------------------------------------------------------------------- Fréchet distance
@pytest.mark.parametrize("seed, dim", [(0, 8), (1, 32), (2, 64)])
def test_frechet_distance_matches_scipy_sqrtm(seed, dim):
    mu1, s1, mu2, s2 = _random_stats(np.random.default_rng(seed), dim)
    ours, reference = frechet_distance(mu1, s1, mu2, s2), _scipy_fid(mu1, s1, mu2, s2)
    assert reference > 1.0
    assert abs(ours - reference) / reference < 1e-6
    # symmetric in its two arguments, as the distance must be
    assert abs(frechet_distance(mu2, s2, mu1, s1) - ours) / ours < 1e-9


def test_fid_of_a_set_against_itself_is_zero_and_mean_shift_is_exact():
    feats = torch.from_numpy(np.random.default_rng(0).standard_normal((400, 24)) * 3 + 1)
    stats = FeatureStats(24)
    stats.update(feats)
    assert abs(frechet_distance(stats.mu, stats.sigma, stats.mu, stats.sigma)) < 1e-6
    # rank-deficient, badly scaled covariance (ReLU features that are always 0, large activations): the
    # square roots of eig(sigma^2) would lose the small eigenvalues; singular values keep them
    g = torch.Generator().manual_seed(0)
    low_rank = torch.randn(400, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 24, generator=g,
                                                                                  dtype=torch.float64) * 30
    low_rank = low_rank + 1e-4 * torch.randn(400, 24, generator=g, dtype=torch.float64)  # eigenvalues 1e4 .. 1e-8
    low_rank[:, :6] = 0
    deficient = FeatureStats(24)
    deficient.update(low_rank)
    assert abs(frechet_distance(deficient.mu, deficient.sigma, deficient.mu, deficient.sigma)) < 1e-6
    shipped = ReferenceStats.load(REPO / "eval" / "digits_train_stats.npz")
    assert abs(frechet_distance(shipped.mu, shipped.sigma, shipped.mu, shipped.sigma)) < 1e-6
    # same covariance, shifted mean: FID = |shift|^2 exactly
    shift = torch.linspace(-1, 2, 24, dtype=torch.float64)
    assert fid_from_features(feats, feats + shift) == pytest.approx(float(shift @ shift), rel=1e-8)
    # unbiased covariance like numpy
    np.testing.assert_allclose(stats.sigma, np.cov(feats.numpy(), rowvar=False), rtol=1e-10, atol=1e-12)


def test_feature_stats_are_additive_and_order_independent():
    feats = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    whole = FeatureStats(6, keep_features=True)
    whole.update(feats)
    parts = FeatureStats(6, keep_features=True)
    parts.update(feats[30:], index=range(30, 50))
    parts.update(feats[:30], index=range(30))
    np.testing.assert_allclose(parts.mu, whole.mu, rtol=1e-12)
    np.testing.assert_allclose(parts.sigma, whole.sigma, rtol=1e-10)
    assert torch.equal(parts.features, feats.float())


# ----------------------------------------------------------------------------- torchmetrics equivalence
@pytest.fixture(scope="module")
def digits():
    from fastgen.metrics.data import builtin_digits

    train, _ = builtin_digits("train")
    heldout, _ = builtin_digits("heldout")
    return get_extractor("digits"), train[:300], heldout


def test_torchmetrics_fid_with_digits_extractor_equals_frechet_distance(digits):
    extractor, real, fake = digits
    fake = (fake + 0.15 * torch.randn(fake.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    metric = torchmetrics_fid(extractor)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    theirs = float(metric.compute())
    ours = fid_from_features(extractor(real), extractor(fake))
    assert ours > 1.0
    assert abs(theirs - ours) / ours < 1e-9


def test_injected_reference_stats_reproduce_raw_feature_fid(digits):
    extractor, real, fake = digits
    raw = torchmetrics_fid(extractor)
    raw.update(real, real=True)
    raw.update(fake, real=False)
    stats = FeatureStats(extractor.num_features)
    stats.update(extractor(real))
    ref = ReferenceStats.from_feature_stats(stats, extractor.name, extractor.resize_mode)
    injected = torchmetrics_fid(extractor, reference=ref)
    injected.update(fake, real=False)
    expected = float(raw.compute())
    assert float(injected.compute()) == pytest.approx(expected, rel=1e-9)
    injected.reset()  # reset_real_features=False keeps the injected statistics
    injected.update(fake, real=False)
    assert float(injected.compute()) == pytest.approx(expected, rel=1e-9)


def test_kid_is_reproducible_and_near_zero_for_one_distribution(digits):
    extractor, real, fake = digits
    fr, ff = extractor(real), extractor(fake)
    a = kernel_inception_distance(fr, ff, subsets=20, subset_size=200, seed=3)
    assert a == kernel_inception_distance(fr, ff, subsets=20, subset_size=200, seed=3)
    noisy = kernel_inception_distance(fr, extractor(torch.rand_like(fake)), subsets=20, subset_size=200)
    assert abs(a[0]) < noisy[0] / 20


# ----------------------------------------------------------------------------- reference statistics files
def test_npz_round_trip_and_foreign_files(tmp_path):
    rng = np.random.default_rng(0)
    mu, s, _, _ = _random_stats(rng, 5)
    feats = rng.standard_normal((7, 5)).astype(np.float32)
    path = ReferenceStats(mu, s, n=7, extractor="digits", resize_mode="none", features=feats,
                          meta={"source": "x"}).save(tmp_path / "ref.npz")
    back = ReferenceStats.load(path)
    assert back.mu.dtype == np.float64 and back.sigma.dtype == np.float64
    np.testing.assert_array_equal(back.mu, mu)
    np.testing.assert_array_equal(back.sigma, s)
    assert (back.n, back.extractor, back.resize_mode, back.meta) == (7, "digits", "none", {"source": "x"})
    np.testing.assert_array_equal(back.features, feats)
    with np.load(path, allow_pickle=False) as data:  # what pytorch-fid / EDM read
        np.testing.assert_array_equal(data["mu"], mu)

    np.savez(tmp_path / "pytorch_fid.npz", mu=mu.astype(np.float32), sigma=s)  # pytorch-fid / EDM layout
    foreign = ReferenceStats.load(tmp_path / "pytorch_fid.npz")
    assert (foreign.n, foreign.extractor) == (0, "unknown")
    np.testing.assert_allclose(foreign.mu, mu, rtol=1e-6)
    np.savez(tmp_path / "lucid.npz", m2=mu, s2=s)
    np.testing.assert_array_equal(ReferenceStats.load(tmp_path / "lucid.npz").sigma, s)

    np.savez(tmp_path / "pickled.npz", mu=np.array([{"a": 1}], dtype=object), sigma=s)
    with pytest.raises(ValueError, match="pickled.npz"):
        ReferenceStats.load(tmp_path / "pickled.npz")
    np.savez(tmp_path / "nokeys.npz", x=mu)
    with pytest.raises(ValueError, match="no 'mu' and 'sigma'"):
        ReferenceStats.load(tmp_path / "nokeys.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        ReferenceStats.load(tmp_path / "missing.npz")


def test_shipped_digits_reference_stats_match_the_train_split(digits):
    extractor, _, _ = digits
    ref = ReferenceStats.load(REPO / "eval" / "digits_train_stats.npz")
    from fastgen.metrics.data import builtin_digits

    feats = extractor(builtin_digits("train")[0])
    assert (ref.n, ref.extractor, ref.num_features) == (1000, "digits", extractor.num_features)
    np.testing.assert_allclose(ref.mu, feats.mean(0).numpy(), rtol=1e-5, atol=1e-6)
    assert frechet_distance(ref.mu, ref.sigma, feats.mean(0), np.cov(feats.numpy(), rowvar=False)) < 1e-6


# ----------------------------------------------------------------------------- CLIP
CLIP_IMAGES = torch.rand(4, 3, 20, 24, generator=torch.Generator().manual_seed(0))
CLIP_CAPTIONS = ["a red cat", "a photo of a dog", "blue house", "a green tree"]


def _tiny_clip_cosines(model, processor):
    uint8 = (CLIP_IMAGES * 255).round().to(torch.uint8)
    with torch.no_grad():
        img = model.get_image_features(**processor(images=list(uint8), return_tensors="pt")).pooler_output
        txt = model.get_text_features(**processor(text=CLIP_CAPTIONS, return_tensors="pt", padding=True)).pooler_output
    return torch.nn.functional.cosine_similarity(img, txt, dim=-1)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    folder = tmp_path_factory.mktemp("clip")
    tokenizer = write_clip_tokenizer(folder)
    text = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2, vocab_size=100,
                max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                                   crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    # A random CLIP may align the test pairs negatively, and CLIPScore clamps at 0, which would make the
    # comparison vacuous: flip the text projection so that the mean cosine is positive.
    if _tiny_clip_cosines(model, processor).mean() < 0:
        model.text_projection.weight.data.neg_()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_clip_score_on_tiny_clip_matches_cosine_formula(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    from fastgen.metrics import clip_score

    score = clip_score(CLIP_IMAGES, CLIP_CAPTIONS, model_name_or_path=tiny_clip, batch_size=3)
    cos = _tiny_clip_cosines(CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip))
    expected = max(float((100 * cos).mean()), 0.0)  # torchmetrics: max(mean of 100 cos, 0)
    assert expected > 0  # otherwise the comparison would be vacuous
    assert score == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_clip_extractor_gives_projected_image_features(tiny_clip):
    extractor = get_extractor("clip", clip_model=str(tiny_clip))
    feats = extractor(torch.rand(3, 1, 16, 16))
    assert feats.shape == (3, 8) and feats.dtype == torch.float64
    assert extractor.name == f"clip:{tiny_clip}"


def test_any_module_is_an_extractor_for_torchmetrics_fid():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())
    with pytest.raises(ValueError, match="probe_shape"):
        get_extractor(module)  # probed with an RGB image, which this 1-channel module rejects
    extractor = ModuleExtractor(module, probe_shape=(1, 8, 8))  # width probed: 4 channels x 2 x 2
    assert extractor.num_features == 16
    real = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    fake = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(2)) ** 2
    metric = torchmetrics_fid(extractor)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    expected = fid_from_features(module(real).detach(), module(fake).detach())
    assert expected > 0 and float(metric.compute()) == pytest.approx(expected, rel=1e-6)


def test_inception_without_extra_is_a_clear_error():
    pytest.importorskip("scipy")  # (always present in the test extra) keeps the test cheap and explicit
    import importlib.util

    if importlib.util.find_spec("torch_fidelity") is not None:
        with pytest.raises(FileNotFoundError, match="--inception-weights"):
            get_extractor("inception", inception_weights="/nonexistent/weights.pth")
    else:
        with pytest.raises(ValueError, match=r"fastgen\[inception\].*--inception-weights"):
            get_extractor("inception")
    with pytest.raises(ValueError, match="features must be one of"):
        get_extractor("vgg")


# ----------------------------------------------------------------------------- precision/recall, saturation
def test_precision_recall_closed_forms():
    real = torch.randn(60, 4, generator=torch.Generator().manual_seed(0))
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)
    half = torch.cat([real[:20], real[:20] + 100.0])  # half the fakes are real samples, half are far away
    precision, _ = precision_recall(real, half)
    assert precision == 0.5
    with pytest.raises(ValueError, match="feature dimensions"):
        precision_recall(real, torch.randn(5, 3))


def test_saturation_and_grayscale_analogues_on_known_images():
    red = torch.zeros(2, 3, 4, 4)
    red[:, 0] = 1.0
    pinkish = torch.tensor([1.0, 0.5, 0.5]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    grey = torch.full((1, 3, 4, 4), 0.3)
    assert mean_saturation(red) == pytest.approx(1.0)
    assert mean_saturation(pinkish) == pytest.approx(0.5)
    assert mean_saturation(grey) == pytest.approx(0.0)
    assert mean_saturation(torch.cat([red[:1], grey])) == pytest.approx(0.5)
    assert mean_saturation(torch.zeros(1, 3, 2, 2)) == 0.0  # black: max = 0
    mid = torch.full((1, 1, 4, 4), 0.5)
    ends = torch.zeros(1, 1, 4, 4)
    ends[..., :1, :] = 1.0
    assert mean_abs_intensity(mid) == pytest.approx(0.0)
    assert mean_abs_intensity(ends) == pytest.approx(1.0)
    quarter = mid.clone()
    quarter[..., 0, :] = 0.0
    assert clipped_fraction(quarter) == pytest.approx(0.25)
    assert clipped_fraction(mid) == 0.0


# ----------------------------------------------------------------------------- CLI and robustness
@pytest.fixture(scope="module")
def tiny_pipe_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipe") / "digits-tiny"
    FastGenClassPipeline(scheduler=DPMSolverMultistepScheduler(), unet=tiny_class_unet()).save_pretrained(folder)
    return folder


def _write_pngs(folder, count, size=(16, 16), seed=0, mode="L"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
        PIL.Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"{i:03d}.png")
    return folder


def _record(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_eval_ref_then_fid_from_stats_equals_fid_from_images(tmp_path, capsys):
    fake = _write_pngs(tmp_path / "fake", 30)
    out = tmp_path / "heldout.npz"
    assert main(["eval", "ref", "--data", "builtin:digits:heldout", "--out", str(out), "--json"]) == 0
    assert _record(capsys)["n"] == 297
    common = ["--fake", str(fake), "--json", "--no-progress", "--kid-subset-size", "20", "--kid-subsets", "10"]
    assert main(["eval", "fid", "--real", str(out), *common]) == 0
    from_stats = _record(capsys)
    assert main(["eval", "fid", "--real", "builtin:digits:heldout", *common, "--grid", str(tmp_path / "g.png")]) == 0
    from_images = _record(capsys)
    assert from_stats["fid"] > 1.0 and from_stats["num_samples"] == 30 and from_stats["nfe"] is None
    for key in ("fid", "kid", "precision", "recall"):
        assert from_stats[key] == pytest.approx(from_images[key], rel=1e-6, abs=1e-9), key
    assert PIL.Image.open(tmp_path / "g.png").width > 64


def test_eval_fid_samples_a_pipeline_independent_of_batch_size(tiny_pipe_folder, tmp_path, capsys):
    common = ["--fake", str(tiny_pipe_folder), "--n", "12", "--steps", "2", "--json", "--no-progress",
              "--kid-subset-size", "10", "--kid-subsets", "5"]
    assert main(["eval", "fid", *common, "--batch-size", "12", "--grid", str(tmp_path / "grid.png")]) == 0
    a = _record(capsys)
    assert main(["eval", "fid", *common, "--batch-size", "5"]) == 0
    b = _record(capsys)
    assert a["nfe"] == 4 and a["num_samples"] == 12 and a["extractor"] == "digits" and 0 <= a["accuracy"] <= 1
    assert set(a) >= {"fid", "kid", "precision", "recall", "accuracy", "roughness", "seconds", "num_samples", "nfe"}
    assert b["fid"] == pytest.approx(a["fid"], rel=1e-4)
    assert PIL.Image.open(tmp_path / "grid.png").height > 64
    assert main(["eval", "fid", *common, "--guidance", "none"]) == 0
    assert _record(capsys)["nfe"] == 2


@pytest.mark.parametrize("case, message", [
    ("unreadable", "bad.png"),
    ("mixed", "must all have the same size"),
    ("empty", "contains no images"),
    ("dims", "8 features but the 'digits' extractor gives 64"),
    ("extractor", "computed with the 'clip:x' extractor"),
    ("features", "features must be one of"),
    ("batch", "batch_size must be a positive integer"),
    ("real", "reference folder"),
])
def test_eval_fid_errors_name_the_file_or_argument(case, message, tmp_path, capsys):
    fake = _write_pngs(tmp_path / "fake", 3)
    args = ["eval", "fid", "--fake", str(fake), "--no-progress"]
    if case == "unreadable":
        (fake / "bad.png").write_bytes(b"not a png at all")
    elif case == "mixed":
        _write_pngs(tmp_path / "fake" / "sub", 1, size=(20, 16))
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        args[3] = str(tmp_path / "empty")
    elif case in ("dims", "extractor"):
        dim = 8 if case == "dims" else 64
        ReferenceStats(np.zeros(dim), np.eye(dim), n=10, extractor="digits" if case == "dims" else "clip:x").save(
            tmp_path / "r.npz")
        args += ["--real", str(tmp_path / "r.npz")]
    elif case == "features":
        args += ["--features", "vgg"]
    elif case == "batch":
        args += ["--batch-size", "0"]
    elif case == "real":
        args += ["--real", str(tmp_path / "nowhere")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err
    if case == "unreadable":
        assert str(fake / "bad.png") in err


def test_nan_features_and_mismatched_dims_are_clear_errors():
    stats = FeatureStats(3)
    with pytest.raises(ValueError, match="NaN"):
        stats.update(torch.tensor([[1.0, float("nan"), 0.0]]))
    with pytest.raises(ValueError, match="expect 3"):
        stats.update(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="mu1 has 3 features"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="sigma1 contains NaN"):
        frechet_distance(np.zeros(2), np.full((2, 2), np.nan), np.zeros(2), np.eye(2))


# ----------------------------------------------------------------------------- processes and imports
# the 2-process accelerate run of the evaluator (which `fastgen eval fid` calls) is in tests/test_evaluate.py


def test_importing_fastgen_does_not_import_torchvision_or_torch_fidelity():
    code = ("import sys, fastgen, fastgen.metrics, fastgen.metrics.fid, fastgen.metrics.features, "
            "fastgen.metrics.clip_score, fastgen.cli_eval; "
            "print([m for m in ('torchvision', 'torch_fidelity', 'torchmetrics') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "[]"
