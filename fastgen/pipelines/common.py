"""What every FastGen pipeline shares: call-argument checks, the save/reload routes, the output type.

Reload routes (see shared notes on diffusers' loader): a saved FastGen folder records
``"_class_name": ["<entry file>", "<ClassName>"]`` and carries the entry file, a two-line module that
re-exports the class from the installed ``fastgen`` package. Then
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` returns the FastGen class, and
``FastGenX.from_pretrained(folder)`` needs no flag because :meth:`FastGenPipelineMixin.load_config`
reads the list form back as the plain class name (no code from the folder is executed).
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput

from ..attention import check_attention_mode, set_attention
from ..guidance import resolve_guidance
from ..denoiser import GUIDANCE_SPACES, Denoiser, GuidedDenoiser
from ..sampling import SampleResult, make_generators, sample_loop
from ..solvers import resolve_solver

ENTRY_PREFIX = "fastgen_"


@dataclass
class FastGenPipelineOutput(BaseOutput):
    """Images plus ``nfe``, the network evaluations spent per image (a CFG step counts 2).

    ``nsfw_content_detected`` is filled by pipelines with a safety checker; ``steps`` records, per step,
    the timestep and the evaluations run (what adaptive guidance decided).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nfe: int = 0
    nsfw_content_detected: list[bool] | None = None
    steps: list[dict[str, Any]] | None = None


@contextlib.contextmanager
def quiet_transformers_import():
    """Silence transformers' 'torchvision not installed, falling back to PIL' notices while importing."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def write_entry_file(folder: str | os.PathLike, cls: type) -> str:
    """Write ``<folder>/<entry>.py`` re-exporting ``cls`` and return the entry module name."""
    entry = cls._fastgen_entry
    source = (
        f'"""diffusers entry file: lets DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)\n'
        f'return fastgen\'s {cls.__name__} (requires `pip install fastgen`)."""\n'
        f"from {cls.__module__} import {cls.__name__}  # noqa: F401\n"
    )
    Path(folder, f"{entry}.py").write_text(source)
    return entry


class FastGenPipelineMixin:
    """Mixin for FastGen pipelines (put it before the diffusers base class)."""

    _fastgen_entry: str = ""  # entry module name, e.g. "fastgen_sd_pipeline"

    # ------------------------------------------------------------------ saving and loading
    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """diffusers' ``save_pretrained`` plus the list-form ``_class_name`` and the entry file."""
        super().save_pretrained(save_directory, *args, **kwargs)
        entry = write_entry_file(save_directory, type(self))
        index_path = Path(save_directory, "model_index.json")
        index = json.loads(index_path.read_text())
        index["_class_name"] = [entry, type(self).__name__]
        tmp = index_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, index_path)

    @classmethod
    def load_config(cls, *args, **kwargs):
        out = super().load_config(*args, **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        name = config.get("_class_name") if isinstance(config, dict) else None
        if isinstance(name, (list, tuple)) and len(name) == 2 and str(name[0]).startswith(ENTRY_PREFIX):
            config["_class_name"] = name[1]
        return out

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, attention: str = "auto", **kwargs):
        """diffusers' ``from_pretrained`` on any standard folder of the family, plus ``attention=``
        (``"auto"``, ``"sdpa"``, ``"xformers"``), checked before anything is loaded."""
        check_attention_mode(attention)
        pipe = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        set_attention(pipe, attention)
        return pipe

    def set_attention(self, mode: str = "auto") -> str:
        """Switch the pipeline's networks to ``"auto"``, ``"sdpa"`` or ``"xformers"`` attention."""
        return set_attention(self, mode)

    # ------------------------------------------------------------------ call helpers
    def _fastgen_prepare(self, *, num_inference_steps, guidance, guidance_scale, solver, guidance_space,
                         teleport, teleport_fraction):
        """Validate FastGen's own call arguments; resolve guidance, solver and teleport (no model work).

        Returns ``(guider, scheduler, teleport)``: ``teleport`` is ``None`` or a callable jump
        (a ``GaussianStats``, loaded from a path when one is given, or the user's own function).
        """
        check_positive_int("num_inference_steps", num_inference_steps)
        if guidance_space not in GUIDANCE_SPACES:
            raise ValueError(f"guidance_space must be one of {GUIDANCE_SPACES}, got {guidance_space!r}.")
        if isinstance(teleport_fraction, bool) or not isinstance(teleport_fraction, (int, float)) or not (
            0.0 <= teleport_fraction < 1.0
        ):
            raise ValueError(f"teleport_fraction must be a number in [0, 1), got {teleport_fraction!r}.")
        if teleport is None and teleport_fraction > 0:
            raise ValueError(f"teleport_fraction ({teleport_fraction!r}) needs teleport (Gaussian statistics); "
                             "without it no step is replaced.")
        from ..teleport import resolve_teleport

        teleport = resolve_teleport(teleport)
        guider = resolve_guidance(guidance, guidance_scale, model_path=getattr(self, "name_or_path", None))
        scheduler = resolve_solver(solver, self.scheduler)
        max_steps = scheduler.config.get("num_train_timesteps")
        if max_steps is not None and num_inference_steps > max_steps:
            raise ValueError(f"num_inference_steps must be at most the scheduler's num_train_timesteps ({max_steps}), "
                             f"got {num_inference_steps}.")
        if guider is not None and hasattr(guider, "prepare_call"):  # fastgen guiders: files and checks, before work
            guider.prepare_call(model_path=getattr(self, "name_or_path", None), scheduler=scheduler,
                                num_inference_steps=num_inference_steps)
        return guider, scheduler, teleport

    def _denoise(self, network, scheduler, latents, timesteps, cond, uncond, guider, *, guidance_space, generator,
                 eta, teleport, teleport_fraction, callback_on_step_end, callback_on_step_end_tensor_inputs,
                 callback_tensors: dict[str, tuple[Any, Any]] | None = None) -> SampleResult:
        """Run :func:`~fastgen.sampling.sample_loop` with diffusers' call plumbing: the step callback (named
        tensors from ``callback_tensors``: name -> (getter, setter)), ``interrupt`` and the progress bar."""
        adapter_scale = contextlib.nullcontext()
        if getattr(self, "_guidance_adapter", None) is not None:  # AGD: CFG at one evaluation per step
            from ..adapters import one_pass_guidance

            guider, adapter_scale = one_pass_guidance(self._guidance_adapter, guider)
        model = GuidedDenoiser(Denoiser.from_scheduler(network, scheduler), guider, cond, uncond, guidance_space)
        callback = None
        if callback_on_step_end is not None:
            tensors = callback_tensors or {}

            def callback(i, t, latents, prediction):
                available = {"latents": latents, **{k: get() for k, (get, _) in tensors.items()}}
                if "denoised" in callback_on_step_end_tensor_inputs:
                    available["denoised"] = prediction.x0
                outputs = dict(callback_on_step_end(self, i, t, {k: available[k] for k in
                                                                 callback_on_step_end_tensor_inputs}) or {})
                latents = outputs.pop("latents", latents)
                for k, v in outputs.items():
                    if k in tensors:
                        tensors[k][1](v)
                return latents

        with adapter_scale:
            return sample_loop(model, latents, scheduler, timesteps,
                               step_kwargs=self._step_kwargs(scheduler, generator, eta), teleport=teleport,
                               teleport_fraction=teleport_fraction, callback=callback,
                               interrupt=lambda: getattr(self, "_interrupt", False), progress_bar=self.progress_bar)

    # ------------------------------------------------------------------ guidance adapters (AGD)
    def load_guidance_adapter(self, path_or_folder):
        """Load a guidance adapter (AGD, arXiv:2503.07274; :mod:`fastgen.adapters`) onto this pipeline's network:
        afterwards ``pipe(..., guidance_scale=w)`` runs one network evaluation per step (``.nfe`` = steps), the
        adapter reproducing CFG at ``w``. ``path_or_folder``: an adapter folder, its ``.safetensors`` file, a
        training run folder, ``builtin:<name>``, or a ``GuidanceAdapter``. Replaces an adapter already loaded."""
        from ..adapters import GuidanceAdapter, load_guidance_adapter

        network = getattr(self, "unet", None)
        network = network if network is not None else getattr(self, "transformer", None)
        adapter = path_or_folder if isinstance(path_or_folder, GuidanceAdapter) else load_guidance_adapter(path_or_folder)
        adapter.check_fits(network)
        self.unload_guidance_adapter()
        adapter.match(network).eval().requires_grad_(False)
        self._guidance_adapter = adapter.attach(network)
        return adapter

    def unload_guidance_adapter(self) -> None:
        """Remove the guidance adapter: the network runs exactly as before, CFG costs two evaluations again."""
        adapter = getattr(self, "_guidance_adapter", None)
        if adapter is not None:
            adapter.detach()
        self._guidance_adapter = None

    # ------------------------------------------------------------------ text-to-image helpers (SD, SDXL)
    def _begin_text_call(self, *, guider, guidance_scale, guidance_rescale, clip_skip, cross_attention_kwargs,
                         prompt, prompt_embeds, num_images_per_prompt, **extra_state) -> int:
        """Set the per-call state diffusers' SD pipelines keep on ``self``; return the number of images."""
        if guider is not None and guidance_rescale > 0 and hasattr(guider, "guidance_rescale"):
            guider.guidance_rescale = guidance_rescale
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        for name, value in extra_state.items():
            setattr(self, f"_{name}", value)
        if prompt is not None:
            batch_size = 1 if isinstance(prompt, str) else len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        return batch_size * num_images_per_prompt

    @staticmethod
    def _add_ip_adapter_embeds(cond: dict, uncond: dict | None, image_embeds) -> None:
        """Split diffusers' IP-Adapter embeddings ([negative, positive] per adapter under CFG) into the branches."""
        if uncond is None:
            cond.setdefault("added_cond_kwargs", {})["image_embeds"] = image_embeds
            return
        pairs = [e.chunk(2) for e in image_embeds]
        uncond.setdefault("added_cond_kwargs", {})["image_embeds"] = [p[0] for p in pairs]
        cond.setdefault("added_cond_kwargs", {})["image_embeds"] = [p[1] for p in pairs]

    def _add_shared_conditions(self, cond: dict, uncond: dict | None, *, guidance_scale, num_images, device, dtype,
                               cross_attention_kwargs) -> None:
        """Arguments both branches pass to the UNet: LCM-style ``timestep_cond`` and ``cross_attention_kwargs``."""
        extras: dict[str, Any] = {}
        if self.unet.config.time_cond_proj_dim is not None:
            scale_tensor = torch.tensor(guidance_scale - 1).repeat(num_images)
            extras["timestep_cond"] = self.get_guidance_scale_embedding(
                scale_tensor, embedding_dim=self.unet.config.time_cond_proj_dim).to(device=device, dtype=dtype)
        if cross_attention_kwargs is not None:
            extras["cross_attention_kwargs"] = cross_attention_kwargs
        for branch in (cond, uncond):
            if branch is not None:
                branch.update(extras)

    @staticmethod
    def _step_kwargs(scheduler, generator, eta) -> dict[str, Any]:
        """``scheduler.step`` extras that this scheduler accepts (``generator``, ``eta``)."""
        params = set(inspect.signature(scheduler.step).parameters)
        kwargs: dict[str, Any] = {}
        if "generator" in params:
            kwargs["generator"] = generator
        if "eta" in params:
            kwargs["eta"] = eta
        return kwargs

    @staticmethod
    def _set_timesteps(scheduler, num_inference_steps, device, timesteps=None, sigmas=None):
        """``scheduler.set_timesteps`` with diffusers' custom ``timesteps``/``sigmas`` handling."""
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

        return retrieve_timesteps(scheduler, num_inference_steps, device, timesteps, sigmas)

    def _rescale_init_noise(self, latents: torch.Tensor, scheduler) -> torch.Tensor:
        """diffusers' ``prepare_latents`` scales noise by ``self.scheduler.init_noise_sigma``; when another
        solver runs this call, rescale to that solver's initial noise level."""
        if scheduler is self.scheduler:
            return latents
        return latents * (scheduler.init_noise_sigma / self.scheduler.init_noise_sigma)

    @staticmethod
    def _generators_from_seed(seed, generator, batch_size: int):
        if seed is None:
            return generator
        if generator is not None:
            raise ValueError("pass either seed or generator, not both.")
        return make_generators(seed, batch_size)
