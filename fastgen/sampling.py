"""The one denoising loop shared by every FastGen pipeline.

teleport (optional) -> for each step: the :class:`~fastgen.denoiser.GuidedDenoiser` evaluates (deciding which
branches run, in one batch), the solver advances the sample. Guidance and solvers never call the network, so
NFE accounting lives in the guided denoiser. Per-sample generators follow EDM's ``StackedRandomGenerator``
idea (Karras et al. 2022, arXiv:2206.00364): a sample depends on its seed, not on the batch it ran in.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .denoiser import GUIDANCE_SPACES, GuidanceContext, GuidedDenoiser, Prediction  # noqa: F401 (re-exports)
from .schedule import NoiseSchedule

StepCallback = Callable[[int, Any, torch.Tensor, Prediction], torch.Tensor]


@dataclass
class SampleResult:
    """Output of :func:`sample_loop`: final latents, network evaluations per sample, per-step record.

    ``nfe`` is the evaluations per sample (an int when every sample cost the same, otherwise the batch mean, as
    with per-sample Adaptive Guidance); ``nfe_per_sample`` has the exact count of each sample.
    """

    latents: torch.Tensor
    nfe: int | float
    steps: list[dict[str, Any]] = field(default_factory=list)
    nfe_per_sample: list[int] = field(default_factory=list)


def make_generators(seed: int | Sequence[int], batch_size: int, device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One generator per sample: ``seed`` is the first sample's seed (then seed+1, ...) or a list of seeds."""
    if isinstance(seed, bool) or not isinstance(seed, (int, list, tuple)):
        raise TypeError(f"seed must be an int or a list of ints, got {type(seed).__name__}.")
    seeds = [int(seed) + i for i in range(batch_size)] if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != batch_size:
        raise ValueError(f"seed must list one seed per image ({batch_size}), got {len(seeds)}.")
    return [torch.Generator(device).manual_seed(s) for s in seeds]


def sample_loop(model: GuidedDenoiser, latents: torch.Tensor, scheduler, timesteps: Sequence | None = None, *,
                step_kwargs: dict[str, Any] | None = None, teleport: Callable | None = None,
                teleport_fraction: float = 0.0, callback: StepCallback | None = None,
                interrupt: Callable[[], bool] | None = None, progress_bar: Callable | None = None) -> SampleResult:
    """Run the denoising loop from ``latents`` (already scaled by the scheduler's ``init_noise_sigma``).

    Args:
        model: the guided denoiser (network, condition, guider).
        scheduler: a diffusers-protocol scheduler with ``set_timesteps`` already called.
        timesteps: the timesteps to run (default ``scheduler.timesteps``).
        step_kwargs: extra ``scheduler.step`` arguments (``generator``, ``eta``).
        teleport: ``fn(x, *, alpha_from, sigma_from, alpha_to, sigma_to) -> x`` replacing the first
            ``round(teleport_fraction * len(timesteps))`` steps by a closed-form jump (no network calls).
        callback: ``fn(i, t, latents, prediction) -> latents`` after each step.
        interrupt: ``fn() -> bool``; steps are skipped while it returns True (diffusers' ``interrupt``).
        progress_bar: a ``pipe.progress_bar``-like context factory taking ``total``.
    """
    timesteps = list(scheduler.timesteps if timesteps is None else timesteps)
    start = teleport_start(len(timesteps), teleport, teleport_fraction)
    if start:
        latents = teleport_latents(model.denoiser.schedule, scheduler, latents, timesteps, start, teleport)
    model.begin_run(len(timesteps), start, latents.shape[0], scheduler=scheduler)
    nfe = torch.zeros(latents.shape[0], dtype=torch.long)
    finite: list[torch.Tensor] = []  # one flag per step, read once after the loop (no device sync per step)
    record: list[dict[str, Any]] = []
    step_kwargs = step_kwargs or {}
    scale_input = getattr(scheduler, "scale_model_input", lambda x, t: x)  # FlowMatch schedulers have none
    with (progress_bar(total=len(timesteps) - start) if progress_bar else _NullBar()) as bar:
        for i in range(start, len(timesteps)):
            if interrupt is not None and interrupt():
                continue
            t = timesteps[i]
            x_in = scale_input(latents, t)
            pred = model(x_in, t, step=i)
            nfe += pred.nfe_per_row
            finite.append(torch.isfinite(pred.model_output).all())
            record.append({"step": i, "timestep": t, "nfe": _per_sample_count(pred.nfe_per_row.tolist()),
                           **model.step_record()})
            latents = scheduler.step(pred.model_output, t, latents, **step_kwargs, return_dict=False)[0]
            if callback is not None:
                latents = callback(i, t, latents, pred)
            bar.update()
    for entry in record:  # timesteps to floats once, after the loop (no device sync per step)
        entry["timestep"] = float(entry["timestep"])
    _check_finite(finite, record)
    counts = nfe.tolist()
    return SampleResult(latents=latents, nfe=_per_sample_count(counts), steps=record, nfe_per_sample=counts)


class NonFiniteError(ValueError):
    """The network produced NaN or inf while sampling (broken weights, an overflowing dtype or scale)."""


def _check_finite(flags: list[torch.Tensor], record: list[dict[str, Any]]) -> None:
    if flags and not bool(torch.stack(flags).all()):
        first = int((~torch.stack(flags)).nonzero()[0])
        raise NonFiniteError(
            f"the network output is NaN/inf at step {record[first]['step']} (timestep {record[first]['timestep']:g}); "
            f"check the model weights, the dtype (fp16 overflow) and guidance_scale.")


def teleport_start(num_steps: int, teleport: Callable | None, teleport_fraction: float) -> int:
    """How many leading steps a teleport jump replaces (0 without one)."""
    if not 0.0 <= float(teleport_fraction) < 1.0:
        raise ValueError(f"teleport_fraction must be in [0, 1), got {teleport_fraction}.")
    return int(round(teleport_fraction * num_steps)) if teleport is not None else 0


def teleport_latents(schedule: NoiseSchedule, scheduler, latents, timesteps, start: int, teleport: Callable):
    """Jump from ``timesteps[0]`` to ``timesteps[start]`` in closed form, then resume the scheduler there."""
    if getattr(scheduler, "init_noise_sigma", 1.0) != 1.0:
        raise ValueError(
            f"teleport needs a variance-preserving solver (init_noise_sigma == 1); {type(scheduler).__name__} "
            f"keeps latents in a variance-exploding space. Use e.g. solver='dpmsolver++', 'unipc', 'deis' or 'ddim'."
        )
    a0, s0 = schedule.alpha_sigma(float(timesteps[0]))
    a1, s1 = schedule.alpha_sigma(float(timesteps[start]))
    out = teleport(latents, alpha_from=float(a0), sigma_from=float(s0), alpha_to=float(a1), sigma_to=float(s1))
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return out.to(latents.dtype)


def _per_sample_count(counts: list[int]) -> int | float:
    """One number for a batch: the common count, or the mean when samples differ."""
    if not counts:
        return 0
    return counts[0] if all(c == counts[0] for c in counts) else sum(counts) / len(counts)


class _NullBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int = 1):
        pass
