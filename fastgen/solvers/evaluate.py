"""Scoring solver schedules on a model: the S³ search's metrics and the FID re-scoring.

* ``FIDEvaluator`` (what the S³ paper optimises): digits FID from :func:`fastgen.metrics.evaluate_pipeline`
  against the shipped train-split statistics (``builtin:digits``), a few hundred samples on fixed seeds and
  labels. Small-sample FID is biased upward, but with the noise held fixed the bias is shared by every
  candidate, so it ranks them; it rewards what the benchmark measures.
* ``ScheduleEvaluator``: RMS distance (output images in [0, 1]) between a schedule's samples and a high-NFE
  DPM-Solver++(2M) reference from the same noise, labels and guidance (:func:`fastgen.metrics.reference_solution`
  and :func:`fastgen.metrics.rms_distance`, the benchmarks' ``rms_to_reference``): needs no feature network, but
  only measures ODE error, and the ODE's own samples are not the best FID a few-step solver reaches. Its top
  candidates are re-ranked by the same distance on disjoint seeds (and get a digits FID where it applies).
"""
from __future__ import annotations

import torch

from ..schedule import NoiseSchedule
from .usf import SolverSchedule

SEARCH_SEED = 10_000  # fitness seeds: disjoint from the benchmark's (0...)
RESCORE_SEED = 20_000  # re-scoring seeds: disjoint from both


def schedule_call_kwargs(schedule, teleport=None) -> dict:
    """Pipeline call arguments for a :class:`SolverSchedule` (with ``teleport``, its first
    ``meta["teleport_steps"]`` steps, default 1, are replaced by the jump) or a tuple
    ``(solver, num_inference_steps, teleport, teleport_fraction)``."""
    if isinstance(schedule, SolverSchedule):
        kwargs = dict(num_inference_steps=schedule.num_evals, solver=schedule)
        if teleport is not None:
            skip = int(schedule.meta.get("teleport_steps", 1))
            kwargs.update(teleport=teleport, teleport_fraction=skip / schedule.num_evals)
        return kwargs
    solver, steps, tele, fraction = schedule
    return dict(num_inference_steps=steps, solver=solver, teleport=tele, teleport_fraction=fraction)


def run_schedule(pipe, schedule, labels, seeds, scale: float, teleport=None, batch: int = 500,
                 output_type: str = "pt") -> torch.Tensor:
    """Samples of ``schedule`` (see :func:`schedule_call_kwargs`; images in [0, 1], or ``"latent"``: model space),
    batched; for distances between samples, not for scoring (scores come from
    :func:`fastgen.metrics.evaluate_pipeline`)."""
    kwargs = schedule_call_kwargs(schedule, teleport)
    out = []
    for start in range(0, len(labels), batch):
        res = pipe(class_labels=labels[start:start + batch], seed=seeds[start:start + batch], guidance_scale=scale,
                   output_type=output_type, **kwargs)
        out.append(res.images.float().cpu())
    return torch.cat(out)


class ScheduleEvaluator:
    """Callable ``schedule -> RMS to the reference`` for :func:`fastgen.solvers.search.search`."""

    name = "rms_to_reference"

    def __init__(self, pipe, *, samples: int = 128, reference_steps: int = 50, scale: float = 3.0, teleport=None,
                 fid: bool = False):
        self.pipe = pipe
        self.scale = scale
        self.teleport = teleport
        self.reference_steps = reference_steps
        self.fid = fid  # also score the re-scored candidates by digits FID (digits models only)
        self.noise_schedule = NoiseSchedule.from_scheduler_config(pipe.scheduler)
        self.samples = samples
        self.labels, self.seeds, self.reference = self._reference(samples, SEARCH_SEED)

    def _reference(self, samples: int, seed: int):
        from ..metrics import reference_solution

        labels = [i % self.pipe.num_classes for i in range(samples)]
        reference = reference_solution(self.pipe, samples, seed=seed, labels=labels, steps=self.reference_steps,
                                       batch_size=500, guidance_scale=self.scale)
        return labels, list(range(seed, seed + samples)), reference

    def distance(self, schedule, labels, seeds, reference) -> float:
        from ..metrics import rms_distance

        return rms_distance(run_schedule(self.pipe, schedule, labels, seeds, self.scale, self.teleport), reference)

    def __call__(self, schedule: SolverSchedule) -> float:
        return self.distance(schedule, self.labels, self.seeds, self.reference)

    def rescore(self, records: list[dict], samples: int) -> SolverSchedule:
        """The best of ``records`` by the same distance on ``samples`` disjoint seeds (20000...)."""
        labels, seeds, reference = self._reference(samples, RESCORE_SEED)
        scorer = FIDEvaluator(self.pipe, samples=samples, scale=self.scale, teleport=self.teleport) if self.fid else None
        best, best_value = None, float("inf")
        for r in records:
            s = SolverSchedule.from_dict(r["schedule"])
            r["rms_to_reference"] = value = self.distance(s, labels, seeds, reference)
            if scorer is not None:
                r["fid"] = scorer.fid(s, samples, RESCORE_SEED)
            if value < best_value:
                best, best_value = s, value
                best.meta.update({"search_metric": r["metric"], "rms_to_reference": value, "rescore_samples": samples,
                                  "fid": r.get("fid"), "fid_samples": samples if scorer is not None else None})
        return best


class FIDEvaluator:
    """Callable ``schedule -> digits FID`` of ``samples`` images on fixed seeds (10000...) and labels (i % classes)."""

    name = "digits_fid"

    def __init__(self, pipe, *, samples: int = 500, scale: float = 3.0, teleport=None):
        from ..metrics import get_extractor, load_reference

        self.pipe = pipe
        self.samples = samples
        self.scale = scale
        self.teleport = teleport
        self.noise_schedule = NoiseSchedule.from_scheduler_config(pipe.scheduler)
        self.extractor = get_extractor("digits", device=pipe.device)
        self.reference = load_reference("builtin:digits", self.extractor)

    def fid(self, schedule, samples: int, seed: int) -> float:
        """Digits FID of ``samples`` images of ``schedule`` (sample i: seed + i, class i % classes)."""
        from ..metrics import evaluate_pipeline

        return evaluate_pipeline(
            self.pipe, samples, seed=seed, extractor=self.extractor, reference=self.reference, batch_size=500,
            classifier=None, knn_metrics=False, progress=False, guidance_scale=self.scale,
            **schedule_call_kwargs(schedule, self.teleport)).fid

    def __call__(self, schedule: SolverSchedule) -> float:
        return self.fid(schedule, self.samples, SEARCH_SEED)

    def rescore(self, records: list[dict], samples: int) -> SolverSchedule:
        return _rescore(self, records, samples)


def _rescore(ev, records: list[dict], samples: int) -> SolverSchedule:
    """FID (digits features, ``samples`` images on seeds 20000...) of the top records; the best by FID,
    with its scores in meta (``search_metric``: the value the search saw)."""
    scorer = ev if isinstance(ev, FIDEvaluator) else FIDEvaluator(ev.pipe, samples=samples, scale=ev.scale,
                                                                  teleport=ev.teleport)
    best, best_fid = None, float("inf")
    for r in records:
        s = SolverSchedule.from_dict(r["schedule"])
        value = scorer.fid(s, samples, RESCORE_SEED)
        r["fid"] = value
        if value < best_fid:
            best, best_fid = s, value
            best.meta.update({"search_metric": r["metric"], "fid": value, "fid_samples": samples})
    return best
