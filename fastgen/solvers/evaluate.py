"""Scoring solver schedules on a model: the S³ search's metrics and the FID re-scoring.

* ``FIDEvaluator`` (what the S³ paper optimises): Fréchet distance of digits features
  (``fastgen.load_builtin("digits-features")``) to ``eval/digits_train_stats.npz``, a few hundred
  samples on fixed seeds and labels. Small-sample FID is biased upward, but with the noise held fixed
  the bias is shared by every candidate, so it ranks them; it rewards what the benchmark measures.
* ``ScheduleEvaluator``: RMS distance (model space) between a schedule's samples and a high-NFE
  DPM-Solver++(2M) reference from the same noise, labels and guidance: needs no feature network, but
  only measures ODE error, and the ODE's own samples are not the best FID a few-step solver reaches.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..schedule import NoiseSchedule
from .usf import SolverSchedule

REFERENCE_STATS = Path(__file__).resolve().parents[1] / "assets" / "digits-reference" / "train_stats.npz"


def run_schedule(pipe, schedule, labels, seeds, scale: float, teleport=None, batch: int = 500) -> torch.Tensor:
    """Samples (model space) of ``schedule`` (a SolverSchedule, a preset or a diffusers solver name), batched.
    With ``teleport``, a SolverSchedule's first step is replaced by the jump (``teleport_fraction = 1/steps``)."""
    out = []
    for start in range(0, len(labels), batch):
        lab, sd = labels[start:start + batch], seeds[start:start + batch]
        if isinstance(schedule, SolverSchedule):
            kw = dict(num_inference_steps=schedule.num_evals, solver=schedule)
            if teleport is not None:
                skip = int(schedule.meta.get("teleport_steps", 1))
                kw.update(teleport=teleport, teleport_fraction=skip / schedule.num_evals)
        else:
            name, steps, tele, frac = schedule
            kw = dict(num_inference_steps=steps, solver=name, teleport=tele, teleport_fraction=frac)
        res = pipe(class_labels=lab, seed=sd, guidance_scale=scale, output_type="latent", **kw)
        out.append(res.images.float().cpu())
    return torch.cat(out)


class DigitsFID:
    """FID on the built-in digits features against the shipped training-split statistics."""

    def __init__(self, stats_path: str | Path = REFERENCE_STATS):
        from ..builtin import load_builtin
        from ..metrics.fid import frechet_distance
        if not Path(stats_path).is_file():
            raise ValueError(f"reference statistics {str(stats_path)!r} do not exist.")
        with np.load(stats_path, allow_pickle=False) as f:
            self.mu, self.sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
        self.net = load_builtin("digits-features").eval()
        self._fd = frechet_distance

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> float:
        feats = torch.cat([self.net.features(x[i:i + 1000].clamp(-1, 1)) for i in range(0, len(x), 1000)]).double().numpy()
        return float(self._fd(feats.mean(0), np.cov(feats, rowvar=False), self.mu, self.sigma))


class ScheduleEvaluator:
    """Callable ``schedule -> RMS to the reference`` for :func:`fastgen.solvers.search.search`."""

    name = "rms_to_reference"

    def __init__(self, pipe, *, samples: int = 128, reference_steps: int = 50, scale: float = 3.0, teleport=None):
        self.pipe = pipe
        self.scale = scale
        self.teleport = teleport
        self.reference_steps = reference_steps
        self.noise_schedule = NoiseSchedule.from_scheduler_config(pipe.scheduler)
        n = pipe.num_classes
        self.labels = [i % n for i in range(samples)]
        self.seeds = list(range(10_000, 10_000 + samples))  # disjoint from the benchmark's seeds
        self.reference = run_schedule(pipe, ("dpmsolver++", reference_steps, None, 0.0), self.labels, self.seeds, scale)

    def __call__(self, schedule: SolverSchedule) -> float:
        x = run_schedule(self.pipe, schedule, self.labels, self.seeds, self.scale, self.teleport)
        return float(((x - self.reference) ** 2).mean().sqrt())

    def rescore(self, records: list[dict], samples: int) -> SolverSchedule:
        return _rescore(self, records, samples)


class FIDEvaluator:
    """Callable ``schedule -> digits FID`` of ``samples`` images on fixed seeds (10000...) and labels."""

    name = "digits_fid"

    def __init__(self, pipe, *, samples: int = 500, scale: float = 3.0, teleport=None):
        self.pipe = pipe
        self.scale = scale
        self.teleport = teleport
        self.noise_schedule = NoiseSchedule.from_scheduler_config(pipe.scheduler)
        self.labels = [i % pipe.num_classes for i in range(samples)]
        self.seeds = list(range(10_000, 10_000 + samples))  # disjoint from the benchmark's and the re-scoring's
        self.fid = DigitsFID()

    def __call__(self, schedule: SolverSchedule) -> float:
        return self.fid(run_schedule(self.pipe, schedule, self.labels, self.seeds, self.scale, self.teleport))

    def rescore(self, records: list[dict], samples: int) -> SolverSchedule:
        return _rescore(self, records, samples)


def _rescore(ev, records: list[dict], samples: int) -> SolverSchedule:
    """FID (digits features, ``samples`` images on seeds 20000...) of the top records; the best by FID,
    with its scores in meta (``search_metric``: the value the search saw)."""
    fid = DigitsFID()
    labels = [i % ev.pipe.num_classes for i in range(samples)]
    seeds = list(range(20_000, 20_000 + samples))
    best, best_fid = None, float("inf")
    for r in records:
        s = SolverSchedule.from_dict(r["schedule"])
        value = fid(run_schedule(ev.pipe, s, labels, seeds, ev.scale, ev.teleport))
        r["fid"] = value
        if value < best_fid:
            best, best_fid = s, value
            best.meta.update({"search_metric": r["metric"], "fid": value, "fid_samples": samples})
    return best
