"""The one denoising loop shared by every FastGen pipeline.

teleport (optional) -> for each step: the guider decides which evaluations run, the denoiser runs
them in one batch, the guider combines them (in x0 space by default), the solver advances the sample.
Guidance and solvers never call the network themselves, so NFE accounting lives here.
Per-sample generators follow EDM's ``StackedRandomGenerator`` idea (Karras et al. 2022): a sample
depends on its seed, not on the batch it ran in.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from .denoiser import Denoiser, concat_conditions

GUIDANCE_SPACES = ("x0", "model")


@dataclass
class SampleResult:
    """Output of :func:`sample_loop`: final latents, network evaluations per sample, per-step record."""

    latents: torch.Tensor
    nfe: int
    steps: list[dict[str, Any]] = field(default_factory=list)


def make_generators(seed: int | Sequence[int], batch_size: int, device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One generator per sample: ``seed`` is the first sample's seed (then seed+1, ...) or a list of seeds."""
    if isinstance(seed, bool) or not isinstance(seed, (int, list, tuple)):
        raise TypeError(f"seed must be an int or a list of ints, got {type(seed).__name__}.")
    seeds = [int(seed) + i for i in range(batch_size)] if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != batch_size:
        raise ValueError(f"seed must list one seed per image ({batch_size}), got {len(seeds)}.")
    return [torch.Generator(device).manual_seed(s) for s in seeds]


def sample_loop(
    denoiser: Denoiser,
    latents: torch.Tensor,
    scheduler,
    timesteps: torch.Tensor,
    cond: Mapping[str, Any],
    uncond: Mapping[str, Any] | None = None,
    guidance=None,
    *,
    guidance_space: str = "x0",
    step_kwargs: Mapping[str, Any] | None = None,
    teleport: Callable | None = None,
    teleport_fraction: float = 0.0,
    callback_on_step_end: Callable | None = None,
    callback_tensors: Mapping[str, Callable[[], torch.Tensor]] | None = None,
    callback_setters: Mapping[str, Callable[[torch.Tensor], None]] | None = None,
    callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    pipe=None,
    progress_bar: Callable | None = None,
) -> SampleResult:
    """Run the denoising loop.

    Args:
        denoiser: network + parameterisation.
        latents: initial latents in the scheduler's space (already scaled by ``init_noise_sigma``).
        scheduler: any diffusers-protocol scheduler with ``set_timesteps`` already called.
        timesteps: the timesteps to run (``scheduler.timesteps`` or a cut of it).
        cond, uncond: keyword arguments of the network for the conditional/unconditional branch.
        guidance: a ``BaseGuidance`` (driven with the diffusers guider protocol) or ``None``.
        guidance_space: ``"x0"`` (guide data predictions, then map back) or ``"model"`` (raw outputs).
        step_kwargs: extra ``scheduler.step`` arguments (``generator``, ``eta``).
        teleport: optional ``fn(x, *, alpha_from, sigma_from, alpha_to, sigma_to) -> x`` replacing the first
            ``round(teleport_fraction * len(timesteps))`` steps by a closed-form jump (no network calls).
        callback_on_step_end: diffusers-style ``fn(pipe, i, t, kwargs) -> dict`` after each step;
            ``callback_tensors`` supplies named tensors besides ``latents``/``denoised``, ``callback_setters``
            writes returned ones back.
        progress_bar: ``pipe.progress_bar``-like context factory taking ``total``.
    """
    if guidance_space not in GUIDANCE_SPACES:
        raise ValueError(f"guidance_space must be one of {GUIDANCE_SPACES}, got {guidance_space!r}.")
    if not 0.0 <= float(teleport_fraction) < 1.0:
        raise ValueError(f"teleport_fraction must be in [0, 1), got {teleport_fraction}.")
    if guidance is not None and uncond is None:
        raise ValueError("guidance needs an unconditional branch (uncond); pass uncond or guidance=None.")
    step_kwargs = dict(step_kwargs or {})
    timesteps = list(timesteps)
    num_steps = len(timesteps)

    start = 0
    if teleport is not None and teleport_fraction > 0:
        start = int(round(teleport_fraction * num_steps))
        latents = _teleport(denoiser, scheduler, latents, timesteps, start, teleport)

    nfe = 0
    record: list[dict[str, Any]] = []
    denoised = None
    bar = progress_bar(total=num_steps - start) if progress_bar is not None else _NullBar()
    with bar:
        for i in range(start, num_steps):
            t = timesteps[i]
            if pipe is not None and getattr(pipe, "_interrupt", False):
                continue
            x_in = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
            n_cond = 1
            if guidance is not None:
                guidance.set_state(step=i, num_inference_steps=num_steps, timestep=t)
                n_cond = guidance.num_conditions
            if n_cond == 2:
                # One batched forward: unconditional first, as diffusers' pipelines order it.
                raw = denoiser(torch.cat([x_in, x_in]), t, concat_conditions([uncond, cond]))
                raw_uncond, raw_cond = raw.chunk(2)
                if guidance_space == "x0":
                    x0_cond, _ = denoiser.to_x0_eps(raw_cond, x_in, t)
                    x0_uncond, _ = denoiser.to_x0_eps(raw_uncond, x_in, t)
                    denoised = guidance.forward(pred_cond=x0_cond, pred_uncond=x0_uncond).pred
                    model_out = denoiser.from_x0(denoised, x_in, t)
                else:
                    model_out = guidance.forward(pred_cond=raw_cond, pred_uncond=raw_uncond).pred
                    denoised = None
            elif n_cond == 1:
                model_out = denoiser(x_in, t, cond)
                denoised = None
            else:
                raise ValueError(f"guidance {type(guidance).__name__} asked for {n_cond} evaluations; FastGen "
                                 f"pipelines run 1 (conditional) or 2 (conditional + unconditional).")
            nfe += n_cond
            record.append({"step": i, "timestep": float(t), "nfe": n_cond})
            latents = scheduler.step(model_out, t, latents, **step_kwargs, return_dict=False)[0]

            if callback_on_step_end is not None:
                available = {"latents": latents, **{k: get() for k, get in (callback_tensors or {}).items()}}
                if "denoised" in callback_on_step_end_tensor_inputs:
                    available["denoised"] = denoised if denoised is not None else denoiser.to_x0_eps(model_out, x_in, t)[0]
                kwargs = {k: available[k] for k in callback_on_step_end_tensor_inputs}
                outputs = callback_on_step_end(pipe, i, t, kwargs) or {}
                latents = outputs.pop("latents", latents)
                for k, v in outputs.items():
                    if callback_setters and k in callback_setters:
                        callback_setters[k](v)
            bar.update()
    return SampleResult(latents=latents, nfe=nfe, steps=record)


def _teleport(denoiser: Denoiser, scheduler, latents, timesteps, start: int, teleport: Callable) -> torch.Tensor:
    """Jump from the first timestep to ``timesteps[start]`` in closed form, then resume the scheduler there."""
    if getattr(scheduler, "init_noise_sigma", 1.0) != 1.0:
        raise ValueError(
            f"teleport needs a variance-preserving solver (init_noise_sigma == 1); {type(scheduler).__name__} "
            f"keeps latents in a variance-exploding space. Use e.g. solver='dpmsolver++', 'unipc', 'deis' or 'ddim'."
        )
    if start == 0:
        return latents
    a0, s0 = denoiser.schedule.alpha_sigma(torch.as_tensor(float(timesteps[0])))
    a1, s1 = denoiser.schedule.alpha_sigma(torch.as_tensor(float(timesteps[start])))
    out = teleport(latents, alpha_from=float(a0), sigma_from=float(s0), alpha_to=float(a1), sigma_to=float(s1))
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return out.to(latents.dtype)


class _NullBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int = 1):
        pass
