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
    """Output of :func:`sample_loop`: final latents, network evaluations per sample, per-step record.

    ``nfe`` is the evaluations per sample (an int when every sample cost the same, otherwise the mean over
    the batch, as with per-sample Adaptive Guidance); ``nfe_per_sample`` has the exact count of each sample.
    """

    latents: torch.Tensor
    nfe: int | float
    steps: list[dict[str, Any]] = field(default_factory=list)
    nfe_per_sample: list[int] = field(default_factory=list)


@dataclass
class GuidanceContext:
    """What a guider may read besides the predictions at one step (given through ``set_model_input``).

    ``x`` is the model input x_t (after ``scale_model_input``), ``alpha``/``sigma`` the forward-process
    coefficients at ``timestep`` (x_t = alpha x0 + sigma eps), ``space`` the space of the predictions the guider
    receives (``"x0"`` or ``"model"``: the network's own parameterisation, ``prediction_type``).
    """

    x: torch.Tensor
    timestep: Any
    alpha: torch.Tensor
    sigma: torch.Tensor
    space: str
    denoiser: Denoiser

    @property
    def prediction_type(self) -> str:
        return self.denoiser.prediction_type

    def to_x0(self, pred: torch.Tensor) -> torch.Tensor:
        return pred if self.space == "x0" else self.denoiser.to_x0_eps(pred, self.x, self.timestep)[0]

    def to_eps(self, pred: torch.Tensor) -> torch.Tensor:
        if self.space == "x0":
            return (self.x - self.alpha * pred) / self.sigma
        return self.denoiser.to_x0_eps(pred, self.x, self.timestep)[1]

    def from_eps(self, eps: torch.Tensor) -> torch.Tensor:
        """The prediction (in ``space``) that corresponds to noise prediction ``eps``."""
        x0 = (self.x - self.sigma * eps) / self.alpha
        return x0 if self.space == "x0" else self.denoiser.from_x0(x0, self.x, self.timestep)


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
        guidance: a ``BaseGuidance`` (driven with the diffusers guider protocol) or ``None``. fastgen's own
            guiders also get the optional hooks of ``fastgen.guidance.base``: ``begin_run`` once before the first
            step (state resets, also for runs starting mid-schedule), ``set_model_input`` each step (x_t, alpha,
            sigma), ``uncond_rows`` (the unconditional branch runs only for those samples; the others get
            ``pred_uncond = pred_cond`` and count 1 NFE), ``wants_conditional_forward`` (``forward`` is called
            with ``pred_cond`` only at a conditional-only step) and ``step_record`` (extra per-step log).
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

    batch = latents.shape[0]
    nfe_per_sample = [0] * batch
    if guidance is not None and hasattr(guidance, "begin_run"):
        guidance.begin_run(num_inference_steps=num_steps, start_step=start, batch_size=batch, scheduler=scheduler,
                           model_path=getattr(pipe, "name_or_path", None) if pipe is not None else None)
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
            rows = None
            if guidance is not None:
                guidance.set_state(step=i, num_inference_steps=num_steps, timestep=t)
                if hasattr(guidance, "set_model_input"):
                    a, s = denoiser.alpha_sigma(t, x_in)
                    guidance.set_model_input(GuidanceContext(x_in, t, a, s, guidance_space, denoiser))
                n_cond = guidance.num_conditions
                if n_cond == 2 and hasattr(guidance, "uncond_rows"):
                    rows = guidance.uncond_rows()
            if n_cond == 2 and (rows is None or bool(rows.all())):
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
                step_nfe = [2] * batch
            elif n_cond == 2:
                # Per-sample split: the unconditional branch only for ``rows``; the other samples are
                # conditional only (pred_uncond = pred_cond there) and cost one evaluation.
                model_out, denoised, step_nfe = _split_forward(denoiser, guidance, x_in, t, cond, uncond, rows,
                                                               guidance_space)
            elif n_cond == 1:
                raw_cond = denoiser(x_in, t, cond)
                denoised = None
                if guidance is not None and getattr(guidance, "wants_conditional_forward", False):
                    if guidance_space == "x0":
                        denoised = guidance.forward(pred_cond=denoiser.to_x0_eps(raw_cond, x_in, t)[0]).pred
                        model_out = denoiser.from_x0(denoised, x_in, t)
                    else:
                        model_out = guidance.forward(pred_cond=raw_cond).pred
                else:
                    model_out = raw_cond
                step_nfe = [1] * batch
            else:
                raise ValueError(f"guidance {type(guidance).__name__} asked for {n_cond} evaluations; FastGen "
                                 f"pipelines run 1 (conditional) or 2 (conditional + unconditional).")
            nfe_per_sample = [a + b for a, b in zip(nfe_per_sample, step_nfe)]
            entry = {"step": i, "timestep": float(t), "nfe": _per_sample_count(step_nfe)}
            if guidance is not None and hasattr(guidance, "step_record"):
                entry.update(guidance.step_record())
            record.append(entry)
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
    return SampleResult(latents=latents, nfe=_per_sample_count(nfe_per_sample), steps=record,
                        nfe_per_sample=nfe_per_sample)


def _per_sample_count(counts: list[int]) -> int | float:
    """One number for a batch: the common count, or the mean when samples differ."""
    if not counts:
        return 0
    return counts[0] if all(c == counts[0] for c in counts) else sum(counts) / len(counts)


def select_rows(condition: Mapping[str, Any], index: torch.Tensor, batch: int) -> dict[str, Any]:
    """The rows ``index`` of a condition dict: tensors (and lists of tensors) whose first dimension is the batch."""
    out: dict[str, Any] = {}
    for key, value in condition.items():
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
            out[key] = value[index.to(value.device)]
        elif isinstance(value, Mapping):
            out[key] = select_rows(value, index, batch)
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
            out[key] = type(value)(v[index.to(v.device)] if v.ndim > 0 and v.shape[0] == batch else v for v in value)
        else:
            out[key] = value
    return out


def _split_forward(denoiser: Denoiser, guidance, x_in, t, cond, uncond, rows: torch.Tensor, guidance_space: str):
    """One forward with the unconditional branch for ``rows`` only (first) and the conditional one for all."""
    batch = x_in.shape[0]
    index = rows.to(x_in.device).nonzero().squeeze(1)
    k = int(index.numel())
    raw = denoiser(torch.cat([x_in[index], x_in]), t, concat_conditions([select_rows(uncond, index, batch), cond]))
    raw_uncond, raw_cond = raw[:k], raw[k:]
    if guidance_space == "x0":
        pred_cond, _ = denoiser.to_x0_eps(raw_cond, x_in, t)
        part, _ = denoiser.to_x0_eps(raw_uncond, x_in[index], t)
    else:
        pred_cond, part = raw_cond, raw_uncond
    pred_uncond = pred_cond.clone()
    pred_uncond[index] = part
    pred = guidance.forward(pred_cond=pred_cond, pred_uncond=pred_uncond).pred
    if guidance_space == "x0":
        denoised, model_out = pred, denoiser.from_x0(pred, x_in, t)
    else:
        denoised, model_out = None, pred
    step_nfe = [1] * batch
    for j in index.tolist():
        step_nfe[j] = 2
    return model_out, denoised, step_nfe


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
