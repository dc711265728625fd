"""Wheel-safe packaging: what the default commands need ships inside the package, and nothing optional loads.

CI (.ci/run) also installs the built wheel into a fresh venv outside the repository and runs the default
commands there; these tests check the same things cheaply inside the test suite.
"""
from __future__ import annotations

import importlib.resources
import json
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ["digits-data/digits.npz", "digits-reference/train_stats.npz", "digits/model_index.json", "digits-1step/model_index.json",
           "digits-features/model.safetensors", "digits-teleport/stats.safetensors", "digits-schedules/nfe5.json",
           "arith-dlm/model_index.json"]
OPTIONAL = ("sklearn", "matplotlib", "scipy", "torch_fidelity")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_dependencies_have_no_optional_packages_and_pin_diffusers_minor():
    project = _pyproject()["project"]
    names = {d.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip().lower() for d in project["dependencies"]}
    assert not names & {"matplotlib", "scikit-learn", "scipy", "torch-fidelity"}
    diffusers = next(d for d in project["dependencies"] if d.startswith("diffusers"))
    assert ">=0.42" in diffusers and "<0.43" in diffusers  # the guiders read BaseGuidance's private attributes
    assert any(d.startswith("matplotlib") for d in project["optional-dependencies"]["plot"])
    assert project["scripts"]["fastgen"] == "fastgen.cli:main"


@pytest.mark.parametrize("relative", SHIPPED)
def test_assets_found_through_importlib_resources(relative):
    resource = importlib.resources.files("fastgen") / "assets" / relative
    assert resource.is_file(), relative
    from fastgen.builtin import asset_path

    assert asset_path(relative).read_bytes() == resource.read_bytes()


def test_asset_path_names_a_missing_asset():
    from fastgen.builtin import asset_path

    with pytest.raises(FileNotFoundError, match="nope.npz"):
        asset_path("nope.npz")


def test_packaged_reference_statistics_are_the_train_split_statistics():
    """The shipped reference is the digits-feature Gaussian of the packaged train split (and equals the
    repository's eval/ copy while both exist)."""
    import torch

    from fastgen import load_builtin
    from fastgen.builtin import asset_path
    from fastgen.datasets import load_digits_images

    with np.load(asset_path("digits-reference/train_stats.npz"), allow_pickle=False) as f:
        mu, sigma, n = f["mu"], f["sigma"], int(f["n"])
    assert mu.dtype == sigma.dtype == np.float64 and mu.shape == (64,) and sigma.shape == (64, 64) and n == 1000
    if (ROOT / "eval" / "digits_train_stats.npz").is_file():
        with np.load(ROOT / "eval" / "digits_train_stats.npz", allow_pickle=False) as g:
            np.testing.assert_array_equal(g["mu"], mu)
            np.testing.assert_array_equal(g["sigma"], sigma)
    x, _ = load_digits_images("train")
    with torch.no_grad():
        feats = load_builtin("digits-features").eval().features(x).double().numpy()
    np.testing.assert_allclose(feats.mean(0), mu, atol=1e-4)


def _run_blocking_optional(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter in which importing any optional dependency fails."""
    prelude = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in OPTIONAL)
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=600,
                          cwd=cwd, env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})


def test_default_commands_import_no_optional_dependency(tmp_path):
    """sample, teleport-stats and eval fid with their defaults (small sizes) run with scikit-learn, matplotlib,
    scipy and torch-fidelity unimportable, from a directory outside the repository."""
    code = """
from fastgen.cli import main
for argv in (["sample", "--count", "1", "--steps", "2", "--output", "s.png", "--json", "--no-progress"],
             ["teleport-stats", "--out", "t.npz", "--json"],
             ["eval", "fid", "--fake", "builtin:digits", "--n", "20", "--steps", "2", "--json", "--no-progress",
              "--no-knn-metrics"]):
    code = main(argv)
    if code:
        sys.exit(f"{argv[0]} exited {code}")
loaded = sorted(m for m in sys.modules if m.split(".")[0] in %r and sys.modules[m] is not None)
print(loaded)
""" % (OPTIONAL,)
    proc = _run_blocking_optional(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "s.png").is_file() and (tmp_path / "t.npz").is_file()
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [("output" in r, "rank" in r, "fid" in r) for r in records] == [
        (True, False, False), (False, True, False), (False, False, True)]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built from a clean copy of the sources (no stale build/ folder can leak into it)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "fastgen", src / "fastgen", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                           str(out), str(src)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {proc.stderr[-500:]}")
    return next(out.glob("fastgen-*.whl"))


def test_wheel_contents(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    for relative in SHIPPED:
        assert f"fastgen/assets/{relative}" in names, relative
    assert {"fastgen/cli/__init__.py", "fastgen/cli/__main__.py", "fastgen/cli/command.py",
            "fastgen/cli/sample.py"} <= names
    assert "fastgen/cli.py" not in names
    assert "fastgen = fastgen.cli:main" in entry
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    for optional in ("matplotlib", "scikit-learn"):
        assert all("extra ==" in line for line in requires if optional in line), optional
    assert any("diffusers" in line and "<0.43" in line for line in requires)


def test_assets_name_no_folder_of_the_machine_they_were_built_on():
    """Every JSON of a shipped asset is free of absolute paths (``_name_or_path`` of a training run, say):
    the builders strip them (``fastgen.benchmarking.strip_machine_paths``)."""
    assets = Path(__file__).resolve().parents[1] / "fastgen" / "assets"
    import re

    absolute = re.compile(r'"(/[\w.-]+/|[A-Za-z]:\\\\)')  # "/dir/..." or "C:\\..."
    offenders = [str(path.relative_to(assets)) for path in assets.rglob("*.json")
                 if absolute.search(text := path.read_text()) or "_name_or_path" in text]
    assert offenders == []
