"""The frozen teacher of a distillation run: a FastGen pipeline, its network in eval mode with no
gradients, and a :class:`fastgen.denoiser.GuidedDenoiser` that applies the teacher's guidance (CFG,
or APG) — to the teacher only, never to the fake score (spec §1.4: mu_c + (w - 1)(mu_c - mu_u)).

Gradients still flow *through* the teacher's activations when a method asks for them (the GAN
generator term reads teacher features of student samples); only its parameters are frozen.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .config import DistillConfig


def make_guider(guidance: str, guidance_scale: float, *, apg_eta: float = 0.0, apg_norm_threshold: float = 15.0,
                apg_momentum: float = 0.0):
    """The teacher's guider: ``None`` (conditional only), ``CFG`` or ``APG`` (no momentum by default:
    training calls are independent, so a momentum buffer carried between them would mix batches)."""
    from ..guidance import APG, CFG

    if guidance == "none":
        return None
    if guidance == "cfg":
        return CFG(guidance_scale=float(guidance_scale))
    if guidance == "apg":
        return APG(guidance_scale=float(guidance_scale), eta=float(apg_eta), norm_threshold=float(apg_norm_threshold),
                   momentum=float(apg_momentum) or None)
    raise ValueError(f"guidance must be one of 'cfg', 'apg', 'none', got {guidance!r}.")


@dataclass
class Teacher:
    """Everything a method needs from the teacher.

    Attributes:
        pipeline: the loaded FastGen pipeline (scheduler, optional VAE / text encoders).
        network: the teacher network (frozen, eval mode). Methods copy it (``copy.deepcopy``) to
            initialise the student and the fake score.
        denoiser: the unguided :class:`fastgen.denoiser.Denoiser` of ``network``.
        guided: the :class:`fastgen.denoiser.GuidedDenoiser` with the teacher's guidance; call
            ``guided(x_t, t, cond=teacher.cond(labels), uncond=teacher.uncond(labels))``.
        scheduler: the teacher's diffusers scheduler (training schedule, prediction type).
        sample_shape: ``(C, H, W)`` of the teacher's inputs (latents for latent models).
        num_classes: number of classes of a class-conditional teacher (``None`` otherwise).
        null_label: the unconditional class id (``num_classes``).
    """

    pipeline: Any
    network: torch.nn.Module
    denoiser: Any
    guided: Any
    scheduler: Any
    sample_shape: tuple[int, ...]
    num_classes: int | None = None
    null_label: int | None = None
    guidance: str = "cfg"
    guidance_scale: float = 1.0
    extra: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ conditions
    def cond(self, labels: torch.Tensor) -> dict[str, Any]:
        """The network's condition kwargs for class ids ``labels``."""
        if self.num_classes is None:
            raise TypeError("cond() takes class ids; text-conditional teachers pass encoder outputs as labels.")
        key = "class_labels"
        return {key: labels}

    def uncond(self, labels: torch.Tensor) -> dict[str, Any]:
        """The unconditional (null-class) condition for a batch like ``labels``."""
        return {"class_labels": torch.full_like(labels, int(self.null_label))}

    def sample_labels(self, n: int, generator: torch.Generator, device) -> torch.Tensor:
        """``n`` class ids drawn uniformly with ``generator``."""
        if self.num_classes is None:
            raise TypeError("sample_labels() draws class ids; text-conditional teachers draw prompts from a prompt dataset.")
        return torch.randint(0, self.num_classes, (n,), generator=generator, device=device)

    # ------------------------------------------------------------------ latents
    @property
    def vae(self):
        return getattr(self.pipeline, "vae", None)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] -> the teacher's input space (VAE latents times the scaling factor, or as is)."""
        vae = self.vae
        if vae is None:
            return pixels
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        return dist.sample(generator) * vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The teacher's input space -> pixels in [-1, 1]."""
        vae = self.vae
        if vae is None:
            return latents
        return vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample

    def to(self, device, dtype: torch.dtype | None = None) -> "Teacher":
        """Move the frozen parts to ``device`` (the network also to ``dtype`` when given)."""
        self.network.to(device=device, **({"dtype": dtype} if dtype is not None else {}))
        for name in ("vae", "text_encoder", "text_encoder_2"):
            module = getattr(self.pipeline, name, None)
            if isinstance(module, torch.nn.Module):
                module.to(device=device)
        return self

    # ------------------------------------------------------------------ text conditions
    @property
    def is_text(self) -> bool:
        return getattr(self.pipeline, "text_encoder", None) is not None or \
            getattr(self.pipeline, "text_encoder_2", None) is not None

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device) -> dict[str, dict]:
        """``{"cond": network kwargs, "uncond": network kwargs}`` of ``prompts`` (empty negative prompt),
        the labels format of text teachers (``split_conditions`` in :mod:`.students`)."""
        pipe = self.pipeline
        if getattr(pipe, "text_encoder_2", None) is not None or "XL" in type(pipe).__name__:
            pe, npe, pooled, npooled = pipe.encode_prompt(prompt=list(prompts), device=device, num_images_per_prompt=1,
                                                          do_classifier_free_guidance=True)
            h, w = (int(s) * pipe.vae_scale_factor for s in self.sample_shape[1:])
            projection_dim = (int(pooled.shape[-1]) if pipe.text_encoder_2 is None
                              else pipe.text_encoder_2.config.projection_dim)
            time_ids = pipe._get_add_time_ids((h, w), (0, 0), (h, w), dtype=pe.dtype,
                                              text_encoder_projection_dim=projection_dim).to(device)
            time_ids = time_ids.repeat(len(prompts), 1)

            def branch(embeds, pool):
                return {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": pool, "time_ids": time_ids}}
            return {"cond": branch(pe, pooled), "uncond": branch(npe, npooled)}
        pe, npe = pipe.encode_prompt(list(prompts), device, 1, True, None)
        return {"cond": {"encoder_hidden_states": pe}, "uncond": {"encoder_hidden_states": npe}}


def load_pipeline(spec: str):
    """A FastGen pipeline from ``builtin:<name>`` or a diffusers folder (the loader ``fastgen sample`` uses)."""
    from ..builtin import load_pipeline as _load

    return _load(spec, device="cpu")


def load_teacher(config: DistillConfig, pipeline=None) -> Teacher:
    """Load ``config.teacher`` and wrap its network: frozen, eval mode, guidance from the config."""
    from ..denoiser import Denoiser, GuidedDenoiser

    pipe = pipeline if pipeline is not None else load_pipeline(config.teacher)
    network = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
    network.eval().requires_grad_(False)
    for name in ("vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    den = Denoiser.from_scheduler(network, pipe.scheduler)
    guider = make_guider(config.guidance, config.guidance_scale, apg_eta=config.apg_eta,
                         apg_norm_threshold=config.apg_norm_threshold, apg_momentum=config.apg_momentum)
    guided = GuidedDenoiser(den, guider=guider, guidance_space="x0")
    cfg = network.config
    channels = int(cfg.get("in_channels", 1))
    size = cfg.get("sample_size", 16)
    size = tuple(size) if isinstance(size, (list, tuple)) else (int(size), int(size))
    num_classes = null = None
    if hasattr(pipe, "num_classes"):
        num_classes = int(pipe.num_classes)
        null = int(pipe.null_class_label)
    return Teacher(pipeline=pipe, network=network, denoiser=den, guided=guided, scheduler=pipe.scheduler,
                   sample_shape=(channels, *size), num_classes=num_classes, null_label=null,
                   guidance=config.guidance, guidance_scale=float(config.guidance_scale))
