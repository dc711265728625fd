"""One- and few-step students: a copy of the teacher network run at a fixed list of timesteps.

A *one-step* student (DMD, Yin et al. 2024, arXiv:2311.18828) is the teacher's network evaluated once at a
fixed timestep ``t*`` on pure noise, its output read as a data prediction ``x0``. A *few-step* student
(DMD2, Yin et al. 2024, arXiv:2405.14867, section 4.4) runs a fixed list ``t_0 > t_1 > ...``: each step
predicts ``x0`` and re-noises it to the next timestep with fresh noise (the ``LCMScheduler`` chain), and
training feeds it inputs by *backward simulation*: the student's own chain, without gradients, up to a
randomly chosen step, so training and inference see the same inputs.

``renoise="ddim"`` re-noises instead with the step's own noise estimate ``eps = (x_t - alpha_t x0) / sigma_t``
(DDIM with eta = 0, Song et al. 2021, arXiv:2010.02502, eq. 12): the chain is then a deterministic map of
the initial noise, as a one-step student is, and each later step refines the previous ``x0`` along the
direction its input came from instead of on an unrelated noise draw. (Stock diffusers route:
``TCDScheduler`` stepped with ``eta=0``, the paper's gamma; see :mod:`fastgen.pipelines.student`.)

The default ``t*`` (:data:`~fastgen.training.config.DEFAULT_ONE_STEP_TIMESTEP`, 500) and why: see its
comment in :mod:`fastgen.training.config`.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..denoiser import Denoiser

from .config import DEFAULT_ONE_STEP_TIMESTEP, GRAD_SPACES, RENOISE_MODES, STEP_DRAWS  # re-exported; defined (and explained) in .config


def _check_choice(value: str, choices: tuple[str, ...], argument: str) -> str:
    if value not in choices:
        raise ValueError(f"{argument} must be one of {choices}, got {value!r}.")
    return value


def check_renoise(value: str, argument: str = "renoise") -> str:
    """Validate a student's re-noising mode (one of :data:`RENOISE_MODES`)."""
    return _check_choice(value, RENOISE_MODES, argument)


def check_step_draw(value: str, argument: str = "step_draw") -> str:
    """Validate how a few-step student's training step is drawn (one of :data:`STEP_DRAWS`)."""
    return _check_choice(value, STEP_DRAWS, argument)


def check_grad_space(value: str, argument: str = "grad_space") -> str:
    """Validate where a few-step student's steps get gradients of equal scale (one of :data:`GRAD_SPACES`)."""
    return _check_choice(value, GRAD_SPACES, argument)


def check_student_timesteps(timesteps: Sequence[int], num_train_timesteps: int = 1000) -> list[int]:
    """Validate a student's timestep list: non-empty, integers in ``[0, T)``, strictly decreasing."""
    ts = list(timesteps) if not isinstance(timesteps, int) else [timesteps]
    if not ts or any(isinstance(t, bool) or not isinstance(t, int) for t in ts):
        raise ValueError(f"student timesteps must be a non-empty list of integers, got {timesteps!r}.")
    if any(not 0 <= t < num_train_timesteps for t in ts):
        raise ValueError(f"student timesteps must lie in [0, {num_train_timesteps}), got {ts}.")
    if any(b >= a for a, b in zip(ts, ts[1:])):
        raise ValueError(f"student timesteps must be strictly decreasing, got {ts}.")
    return ts


def null_class_label(network: torch.nn.Module) -> int | None:
    """The unconditional label of a class-conditional diffusers network (``None`` if not class-conditional)."""
    cfg = getattr(network, "config", {})
    if cfg.get("num_class_embeds") is not None:
        return int(cfg["num_class_embeds"]) - 1
    if cfg.get("num_embeds_ada_norm") is not None:
        return int(cfg["num_embeds_ada_norm"])
    return None


def split_conditions(labels: Any, null_label: int | None = None) -> tuple[dict, dict | None]:
    """``(cond, uncond)`` network kwargs from a batch's labels.

    * LongTensor ``[B]`` of class ids: ``{"class_labels": labels}`` and the null class as ``uncond``;
    * ``{"cond": {...}, "uncond": {...}}``: the two dicts (text models: encoder outputs);
    * any other dict: used as ``cond``, no ``uncond`` (no CFG possible).
    """
    if isinstance(labels, torch.Tensor):
        uncond = None if null_label is None else {"class_labels": torch.full_like(labels, null_label)}
        return {"class_labels": labels}, uncond
    if isinstance(labels, Mapping):
        if "cond" in labels:
            return dict(labels["cond"]), (dict(labels["uncond"]) if labels.get("uncond") is not None else None)
        return dict(labels), None
    raise TypeError(f"labels must be a LongTensor of class ids or a dict of network inputs, got {type(labels).__name__}.")


class Student(torch.nn.Module):
    """A one- or few-step generator: ``network`` (a teacher copy or a LoRA view of it) at ``timesteps``.

    Args:
        network: the diffusers network (registered as the submodule ``network``; its weights are the
            student's weights).
        schedule: the teacher's :class:`~fastgen.schedule.NoiseSchedule`.
        prediction_type: the teacher's parameterisation; the output is converted to ``x0``.
        timesteps: the student's step list, e.g. ``[700]`` (one step) or ``[999, 749, 499, 249]``.
        adapter: with a LoRA student, the name of its adapter (activated around every forward).
        renoise: how a few-step student's next input is made from ``x0``: ``"fresh"`` (fresh Gaussian noise,
            DMD2 and ``LCMScheduler``) or ``"ddim"`` (the step's own noise estimate; deterministic chain).
        step_draw: the training forward's step when none is given: one random step for the whole batch
            (``"batch"``, DMD2's generator turn) or one per sample (``"sample"``: every batch mixes all steps;
            the chain then runs to the largest drawn step for every sample).
        grad_space: where the training forward's steps get loss gradients of equal scale: ``"x0"`` (DMD2: the
            gradient on a step's x0 reaches its network output times ``|dx0/dout|`` at that step's timestep,
            ``sigma/alpha`` for epsilon prediction, far smaller at low-noise steps) or ``"output"``
            (the x0 gradient of step ``k`` is multiplied by ``|dx0/dout|(t_0) / |dx0/dout|(t_k)``: every step's
            network output sees the first step's scale; forward values are unchanged, and so is step 0).
    """

    def __init__(self, network: torch.nn.Module, schedule, prediction_type: str = "epsilon",
                 timesteps: Sequence[int] = (DEFAULT_ONE_STEP_TIMESTEP,), adapter: str | None = None,
                 renoise: str = "fresh", step_draw: str = "batch", grad_space: str = "x0"):
        super().__init__()
        self.network = network
        self.timesteps = check_student_timesteps(list(timesteps), schedule.num_train_timesteps)
        self.adapter = adapter
        self.renoise_mode = check_renoise(renoise)
        self.step_draw = check_step_draw(step_draw)
        self.grad_space = check_grad_space(grad_space)
        # Not a submodule: the denoiser only refers to ``network`` (registered once, above).
        self.__dict__["denoiser"] = Denoiser(network, schedule, prediction_type)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def denoise(self, x: torch.Tensor, step: int | torch.Tensor, cond: Mapping[str, Any]) -> torch.Tensor:
        """``x0`` from the student's input ``x`` at step index ``step`` (timestep ``timesteps[step]``; a tensor of
        indices gives each sample its own step)."""
        if isinstance(step, torch.Tensor):
            t = torch.tensor(self.timesteps, device=x.device, dtype=torch.long)[step.to(x.device)]
        else:
            t = torch.full((x.shape[0],), self.timesteps[step], device=x.device, dtype=torch.long)
        if self.adapter is None:
            return self.denoiser.predict(x, t, cond)[0]
        from .lora import use_adapter

        with use_adapter(self.network, self.adapter):
            return self.denoiser.predict(x, t, cond)[0]

    def renoise(self, x: torch.Tensor, x0: torch.Tensor, step: int, generator) -> torch.Tensor:
        """The input of step ``step`` from step ``step - 1``'s input ``x`` and output ``x0``: ``alpha x0 + sigma eps``.

        ``eps`` is fresh noise (``renoise="fresh"``, LCMScheduler's chain) or, with ``renoise="ddim"``, the
        previous step's noise estimate ``(x - alpha' x0) / sigma'``.
        """
        if self.renoise_mode == "ddim":
            a_prev, s_prev = self.denoiser.alpha_sigma(self.timesteps[step - 1], like=x0)
            noise = (x - a_prev * x0) / s_prev
        else:
            noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        a, s = self.denoiser.alpha_sigma(self.timesteps[step], like=x0)
        return a * x0 + s * noise

    @torch.no_grad()
    def input_of(self, step: int | torch.Tensor, noise: torch.Tensor, cond: Mapping[str, Any], generator=None
                 ) -> torch.Tensor:
        """The input of step ``step``: the student's own chain from ``noise`` without gradient (DMD2's
        backward simulation; ``noise`` itself for step 0). With a tensor of indices, row ``i`` is the input of
        step ``step[i]`` (one chain for the batch, run to the largest step)."""
        per_row = isinstance(step, torch.Tensor)
        if per_row:
            step = step.to(noise.device)
        x = inputs = noise
        for i in range(int(step.max()) if per_row else step):
            x = self.renoise(x, self.denoise(x, i, cond), i + 1, generator)
            if per_row:
                inputs = torch.where((step == i + 1).reshape((-1,) + (1,) * (x.ndim - 1)), x, inputs)
        return inputs if per_row else x

    def forward(self, noise: torch.Tensor, cond: Mapping[str, Any], generator=None,
                step: int | torch.Tensor | None = None) -> torch.Tensor:
        """Training forward: ``x0`` with gradient at step ``step`` (an index, or one per sample; random from
        ``generator`` if ``None``, drawn as :attr:`step_draw` says).

        Earlier steps run without gradient from ``noise`` (DMD2's backward simulation).
        """
        if step is None:
            step = self.draw_step(noise.shape[0], generator)
        x0 = self.denoise(self.input_of(step, noise, cond, generator), step, cond)
        if self.grad_space == "output" and self.num_steps > 1 and x0.requires_grad:
            x0.register_hook(lambda grad, scale=self.output_grad_scale(step, like=x0): grad * scale)
        return x0

    def draw_step(self, rows: int, generator=None) -> int | torch.Tensor:
        """A training step index as :attr:`step_draw` says: one for the batch (an ``int``) or one per row (a
        tensor of ``rows`` indices); 0 for a one-step student, drawing nothing."""
        if self.num_steps == 1:
            return 0
        step = torch.randint(self.num_steps, (rows if self.step_draw == "sample" else 1,), generator=generator,
                             device=getattr(generator, "device", "cpu"))
        return step if self.step_draw == "sample" else int(step)

    def output_grad_scale(self, step: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``|dx0/dout|`` at the first step over its value at step ``step`` (one value per row for a tensor of
        indices), shaped to broadcast against ``like``: the factor of ``grad_space="output"``."""
        ts = torch.tensor(self.timesteps, device=like.device, dtype=torch.long)
        t = ts[step.to(like.device)] if isinstance(step, torch.Tensor) else ts[step]
        gain = self.denoiser.parameterization.x0_gain
        return gain(*self.denoiser.alpha_sigma(ts[0], like=like)) / gain(*self.denoiser.alpha_sigma(t, like=like))

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, cond: Mapping[str, Any], generator=None) -> torch.Tensor:
        """The full chain from ``noise``: ``x0`` after ``num_steps`` network evaluations."""
        last = self.num_steps - 1
        return self.denoise(self.input_of(last, noise, cond, generator), last, cond)
