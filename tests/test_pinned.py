"""Pinned outputs of fastgen's own methods: values from a known-good run, compared as literal numbers.

The exactness tests elsewhere compare fastgen with diffusers where diffusers has the same method; the
methods fastgen adds (``usf-default``, the shipped S³ schedules, teleportation, APG / AG / LinearAG in the
FastGen loop) have no such reference, so their outputs are pinned here through public APIs only (pipeline
``__call__``, :func:`fastgen.teleport.teleport`). A refactor that keeps the outputs keeps these green; a
changed order, sign or threshold turns them red.

Each case pins a *fingerprint* of its output (per image: three fixed cosine-weighted sums of all its values,
divided by sqrt(numel), so one changed pixel moves them and float32 round-off does not), the NFE per image
and, for Adaptive Guidance, the truncation step of each image. The digits model's final samples are
thresholded to [-1, 1] (its corners are exactly -1), which is why a corner slice would not do.

Regenerate (after an *intended* change of outputs, say why in the commit)::

    PYTHONPATH=$PWD python tests/test_pinned.py
"""
from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fastgen  # noqa: E402
from fastgen import FastGenStableDiffusionPipeline, FastGenStableDiffusionXLPipeline  # noqa: E402
from fastgen.builtin import ASSETS_DIR  # noqa: E402
from fastgen.guidance import APG, CFG, AdaptiveGuidance, LinearAG  # noqa: E402
from fastgen.solvers import SolverSchedule  # noqa: E402
from fastgen.teleport import ClassGaussianStats, GaussianStats, teleport  # noqa: E402
from tiny import tiny_sd, tiny_sdxl  # noqa: E402

ATOL, RTOL = 1e-4, 1e-5  # float32 models; RTOL for the tiny SD/SDXL latents, which reach |x| ~ 30
SCHEDULES = ASSETS_DIR / "digits-schedules"
TELEPORT = ASSETS_DIR / "digits-teleport"
SEEDS = [0, 1]


def fingerprint(images) -> list[float]:
    """Per image, ``sum_j w_k[j] x[j] / sqrt(numel)`` for ``w_k[j] = cos(0.37 (k + 1) j + k)``, k = 0, 1, 2."""
    x = torch.as_tensor(images).detach().double().reshape(len(images), -1).cpu()
    j = torch.arange(x.shape[1], dtype=torch.float64)
    w = torch.stack([torch.cos(0.37 * (k + 1) * j + k) for k in range(3)], dim=1)
    return (x @ w / math.sqrt(x.shape[1])).reshape(-1).tolist()


# ------------------------------------------------------------------------------------------ cases
def digits_call(pipe, **kw):
    call = dict(class_labels=[3, 7], guidance_scale=3.0, seed=SEEDS, output_type="latent")
    call.update(kw)
    return pipe(**call)


def s3_case(name):
    def run(pipes):
        path = SCHEDULES / f"{name}.json"
        schedule = SolverSchedule.load(path)
        skip = int(schedule.meta.get("teleport_steps", 0))
        kw = {}
        if skip:  # searched with a teleport replacing its first step (as benchmarks/solvers.py runs it)
            kw = dict(teleport=str(TELEPORT / "stats.safetensors"), teleport_fraction=skip / schedule.num_evals)
        return digits_call(pipes["digits"], num_inference_steps=schedule.num_evals, solver=str(path), **kw), None
    return run


def digits_guider(make, steps=6):
    def run(pipes):
        guider = make()
        out = digits_call(pipes["digits"], num_inference_steps=steps, guidance=guider)
        return out, guider
    return run


def text_guider(kind, make):
    def run(pipes):
        guider = make()
        out = pipes[kind](prompt=["a cat", "a dog"], num_inference_steps=4, guidance=guider, guidance_scale=5.0,
                          seed=SEEDS, output_type="latent")
        return out, guider
    return run


def closed_form_teleport(pipes):
    """The closed-form jump on a 6-d Gaussian of rank 3 with an isotropic remainder (float64)."""
    d = torch.arange(6, dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.cos(0.9 * d[:, None] * (d[None, :] + 1) + 0.3))  # sign-free: enters as u u^T
    stats = GaussianStats(0.1 * d - 0.2, torch.tensor([2.0, 0.7, 0.15], dtype=torch.float64), basis[:, :3], 0.05)
    x = torch.stack([torch.sin(1.3 * d + 0.5), torch.cos(0.8 * d - 1.0) * 1.5])
    return teleport(x, stats, alpha_from=0.1, sigma_from=math.sqrt(1 - 0.01), alpha_to=0.7,
                    sigma_to=math.sqrt(1 - 0.49)), None


LINEAR_AG_DIGITS = {"format": "fastgen-linear-ag/1", "num_inference_steps": 6, "guidance_scale": 3.0,
                    "steps": {"1": [0.5, -0.2, 0.7, 0.0], "2": [0.6, -0.1, 0.5, 0.01]}}
LINEAR_AG_TEXT = {"format": "fastgen-linear-ag/1", "num_inference_steps": 4, "guidance_scale": 5.0,
                  "steps": {"1": [0.5, -0.2, 0.7, 0.0]}}

CASES = {
    "digits/usf-default-nfe6": lambda p: (digits_call(p["digits"], num_inference_steps=6, solver="usf-default"), None),
    **{f"digits/s3-{n}": s3_case(n) for n in ("nfe4", "nfe5", "nfe5-teleport", "nfe6", "nfe8", "nfe10")},
    "digits/teleport-stats": lambda p: (digits_call(p["digits"], num_inference_steps=10, teleport=GaussianStats.load(
        TELEPORT / "stats.safetensors"), teleport_fraction=0.3), None),
    "digits/teleport-class-guided": lambda p: (digits_call(p["digits"], num_inference_steps=10, teleport=ClassGaussianStats.load(
        TELEPORT / "class_stats.safetensors"), teleport_fraction=0.3), None),
    "teleport/closed-form": closed_form_teleport,
    "digits/cfg": digits_guider(lambda: CFG(guidance_scale=3.0)),
    "digits/apg": digits_guider(lambda: APG(guidance_scale=3.0)),
    # γ (x0 space) of image 0 passes 0.94 at step 1, image 1 at step 3: truncation steps 2 and 4
    "digits/ag": digits_guider(lambda: AdaptiveGuidance(guidance_scale=3.0, threshold=0.94, space="x0")),
    "digits/linear-ag": digits_guider(lambda: LinearAG(coefficients=LINEAR_AG_DIGITS)),
}
for _kind in ("sd", "sdxl"):
    CASES.update({
        f"{_kind}/cfg": text_guider(_kind, lambda: CFG(guidance_scale=5.0)),
        f"{_kind}/apg": text_guider(_kind, lambda: APG(guidance_scale=5.0)),
        # tiny SD: γ_ε ≈ 0.9999 at once (trips at step 0); tiny SDXL: γ_ε passes 0.997 at step 1 / step 2
        f"{_kind}/ag": text_guider(_kind, lambda k=_kind: AdaptiveGuidance(
            guidance_scale=5.0, threshold=0.991 if k == "sd" else 0.997)),
        f"{_kind}/linear-ag": text_guider(_kind, lambda: LinearAG(coefficients=LINEAR_AG_TEXT)),
    })


def build_pipes(folder: Path) -> dict:
    digits = fastgen.load_builtin("digits")
    sd = FastGenStableDiffusionPipeline.from_pipe(tiny_sd(folder / "sd"))
    sdxl = FastGenStableDiffusionXLPipeline.from_pipe(tiny_sdxl(folder / "sdxl"))
    for pipe in (digits, sd, sdxl):
        pipe.set_progress_bar_config(disable=True)
    return {"digits": digits, "sd": sd, "sdxl": sdxl}


def measure(name: str, pipes: dict) -> dict:
    out, guider = CASES[name](pipes)
    if isinstance(out, torch.Tensor):
        return {"values": fingerprint(out)}
    result = {"values": fingerprint(out.images), "nfe": float(out.nfe)}
    if isinstance(guider, AdaptiveGuidance):
        result["truncation"] = guider.truncation_step
    return result


# ------------------------------------------------------------------------------------------ pinned values
# Generated by `python tests/test_pinned.py` from the code of commit 35afc91 (before the Core II refactor).
PINNED: dict[str, dict] = {
    'digits/usf-default-nfe6': {'values': [-0.1797724, 0.3927543, -0.0039778, -0.5207791, -0.5120768, 0.0753546], 'nfe': 12.0},
    'digits/s3-nfe4': {'values': [-0.4509977, 0.2737034, -0.0301931, -0.6639032, -0.5011329, 0.1138663], 'nfe': 8.0},
    'digits/s3-nfe5': {'values': [-0.3729557, 0.1608707, -0.0778941, -0.5998532, -0.3006554, 0.0094150], 'nfe': 10.0},
    'digits/s3-nfe5-teleport': {'values': [-0.0530358, 0.4338981, -0.0020579, -0.4687357, -0.4354749, 0.0770124], 'nfe': 10.0},
    'digits/s3-nfe6': {'values': [-0.2538286, 0.4511754, -0.0516413, -0.4626539, -0.6098459, 0.0110636], 'nfe': 12.0},
    'digits/s3-nfe8': {'values': [0.0552180, 0.8737127, 0.0880148, -0.4588542, -0.5086846, -0.0143439], 'nfe': 16.0},
    'digits/s3-nfe10': {'values': [-0.3814538, 0.4077539, 0.0221857, -0.4165006, -0.5283239, 0.0268043], 'nfe': 20.0},
    'digits/teleport-stats': {'values': [-0.1213016, 0.5104688, 0.0256292, -0.6211207, -0.4161672, 0.0468996], 'nfe': 14.0},
    'digits/teleport-class-guided': {'values': [-0.2174191, 0.3767692, -0.0163860, -0.7206095, -0.4465883, 0.0643088], 'nfe': 14.0},
    'teleport/closed-form': {'values': [0.1865822, 0.6859627, -0.8038044, 1.0149647, -0.0478884, -1.0445894]},
    'digits/cfg': {'values': [-0.1894149, 0.3579528, -0.0263457, -0.7123124, -0.4442634, 0.0802081], 'nfe': 12.0},
    'digits/apg': {'values': [-0.0668864, 0.3531756, -0.0065499, -0.6625429, -0.3303683, 0.1804539], 'nfe': 12.0},
    'digits/ag': {'values': [-0.1394148, 0.4686300, 0.0365844, -0.5889147, -0.3812273, 0.1327167], 'nfe': 9.0, 'truncation': [2, 4]},
    'digits/linear-ag': {'values': [-0.2558516, 0.2768422, -0.0379624, -0.3765578, -0.3286979, 0.1290565], 'nfe': 8.0, 'truncation': [4, 4]},
    'sd/cfg': {'values': [-9.4448533, -0.0692979, -13.2601024, 7.6908056, -26.4692417, 19.4728239], 'nfe': 8.0},
    'sd/apg': {'values': [-9.4377258, -0.0009032, -13.2977120, 7.6117482, -26.4925575, 19.4618650], 'nfe': 8.0},
    'sd/ag': {'values': [-9.4399295, -0.0578250, -13.2641556, 7.6953708, -26.4582626, 19.4749077], 'nfe': 5.0, 'truncation': [1, 1]},
    'sd/linear-ag': {'values': [-9.7214899, -0.0210599, -13.6493228, 7.5434006, -26.9178082, 18.2755271], 'nfe': 6.0, 'truncation': [3, 3]},
    'sdxl/cfg': {'values': [-5.4093846, -0.2151291, -1.8123520, 1.7548332, -8.9861164, 1.0807551], 'nfe': 8.0},
    'sdxl/apg': {'values': [-5.3705971, -0.3491225, -1.9984399, 1.7784268, -8.8704644, 0.8461885], 'nfe': 8.0},
    'sdxl/ag': {'values': [-5.3683239, -0.2493714, -1.8954385, 1.7664374, -9.0079473, 1.0348285], 'nfe': 6.5, 'truncation': [2, 3]},
    'sdxl/linear-ag': {'values': [-5.1629806, 0.1652624, -2.1361891, 2.1598958, -8.7580266, 1.1011080], 'nfe': 6.0, 'truncation': [3, 3]},
}


# ------------------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    return build_pipes(tmp_path_factory.mktemp("pinned"))


def test_every_case_is_pinned():
    assert sorted(PINNED) == sorted(CASES)
    shipped = {p.stem for p in SCHEDULES.glob("*.json") if not p.name.endswith(".state.json")}
    assert len(shipped) == 6 and {f"digits/s3-{s}" for s in shipped} <= set(CASES)  # every shipped schedule


@pytest.mark.parametrize("name", sorted(CASES))
def test_pinned_output(pipes, name):
    got, want = measure(name, pipes), PINNED[name]
    assert got.get("nfe") == want.get("nfe")
    assert got.get("truncation") == want.get("truncation")
    assert len(got["values"]) == len(want["values"])
    diff = max(abs(a - b) - RTOL * abs(b) for a, b in zip(got["values"], want["values"]))
    assert diff <= ATOL, f"{name}: fingerprint moved by {diff:.3g}\n got  {got['values']}\n want {want['values']}"


def main() -> None:
    """Print the ``PINNED`` literal for the current code."""
    with tempfile.TemporaryDirectory() as folder:
        pipes = build_pipes(Path(folder))
        print("PINNED: dict[str, dict] = {")
        for name in CASES:
            m = measure(name, pipes)
            values = ", ".join(f"{v:.7f}" for v in m.pop("values"))
            extra = "".join(f", {k!r}: {v!r}" for k, v in m.items())
            print(f"    {name!r}: {{'values': [{values}]{extra}}},")
        print("}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import conftest  # noqa: F401  (same offline / thread settings as the test run)
    main()
