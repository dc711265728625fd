"""FastGenClassPipeline: class-conditional diffusion (UNet2DModel with class embeddings, or DiT)."""
from typing import Any, Callable

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, DiTTransformer2DModel, Transformer2DModel, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from ..teleport import ClassGaussianStats
from .common import FastGenPipelineMixin, FastGenPipelineOutput

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class FastGenClassPipeline(FastGenPipelineMixin, DiffusionPipeline):
    """Class-conditional sampling with fastgen guidance and solvers, pixel or latent space.

    Components: ``scheduler`` and one network, either ``unet`` (``UNet2DModel`` with
    ``num_class_embeds = num_classes + 1``; the last class index is the unconditional/null label used
    for classifier-free guidance) or ``transformer`` (DiT, ``num_embeds_ada_norm`` classes, null label
    = ``num_embeds_ada_norm`` as in diffusers' DiTPipeline). An optional ``vae`` decodes latents.
    Loads standard DiT folders (``FastGenClassPipeline.from_pretrained(dit_folder)``) and the built-in
    digits model (``fastgen.load_builtin("digits")``).
    """

    model_cpu_offload_seq = "unet->transformer->vae"
    _optional_components = ["unet", "transformer", "vae"]
    _callback_tensor_inputs = ["latents", "denoised", "class_labels"]
    _fastgen_entry = "fastgen_class_pipeline"

    def __init__(
        self,
        scheduler: SchedulerMixin,
        unet: UNet2DModel | None = None,
        transformer: DiTTransformer2DModel | Transformer2DModel | None = None,
        vae: AutoencoderKL | None = None,
        id2label: dict | None = None,
    ):
        super().__init__()
        if (unet is None) == (transformer is None):
            raise ValueError("FastGenClassPipeline needs exactly one network: pass unet= or transformer=, not both or neither.")
        self.register_modules(unet=unet, transformer=transformer, vae=vae, scheduler=scheduler)
        self.register_to_config(id2label={str(k): v for k, v in id2label.items()} if id2label else None)
        self.labels: dict[str, int] = {}
        for key, value in (id2label or {}).items():
            for name in str(value).split(","):
                self.labels[name.strip()] = int(key)

    # ------------------------------------------------------------------ model facts
    @property
    def network(self) -> torch.nn.Module:
        return self.unet if self.unet is not None else self.transformer

    @property
    def num_classes(self) -> int:
        cfg = self.network.config
        if self.unet is not None:
            if cfg.get("num_class_embeds") is None or cfg.get("class_embed_type") is not None:
                raise ValueError("unet must be a UNet2DModel with num_class_embeds (and no class_embed_type) to be class-conditional.")
            return int(cfg.num_class_embeds) - 1
        return int(cfg.num_embeds_ada_norm)

    @property
    def null_class_label(self) -> int:
        return self.num_classes

    def label_name(self, class_id: int) -> str:
        """The ``id2label`` name of a class id (the id itself when there is none)."""
        return str((self.config.id2label or {}).get(str(int(class_id)), int(class_id)))

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Map label names (from ``id2label``) to class ids."""
        names = [label] if isinstance(label, str) else list(label)
        unknown = [n for n in names if n not in self.labels]
        if unknown:
            raise ValueError(f"class_labels names {unknown} are not known; accepted names: {sorted(self.labels)}.")
        return [self.labels[n] for n in names]

    def _class_label_tensor(self, class_labels, device=None) -> torch.Tensor:
        if class_labels is None:
            raise ValueError(f"class_labels is required: a class id in [0, {self.num_classes}) or a list of them.")
        if isinstance(class_labels, torch.Tensor):
            class_labels = class_labels.reshape(-1).tolist()
        if isinstance(class_labels, (int, np.integer, str)):
            class_labels = [class_labels]
        if not isinstance(class_labels, (list, tuple)) or len(class_labels) == 0:
            raise ValueError(f"class_labels must be an int, a str or a non-empty list of them, got {class_labels!r}.")
        ids = []
        for label in class_labels:
            if isinstance(label, str):
                ids.extend(self.get_label_ids(label))
            elif isinstance(label, (int, np.integer)) and not isinstance(label, bool) and 0 <= label < self.num_classes:
                ids.append(int(label))
            else:
                raise ValueError(f"class_labels entries must be class ids in [0, {self.num_classes}), got {label!r}.")
        return torch.tensor(ids, dtype=torch.long, device=device or self._execution_device)

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | list[int] | list[str] | torch.Tensor | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 3.0,
        guidance=None,
        solver=None,
        teleport: Callable | None = None,
        teleport_fraction: float = 0.0,
        guidance_space: str = "x0",
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | list[int] | None = None,
        latents: torch.Tensor | None = None,
        timesteps: list[int] | None = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
    ) -> FastGenPipelineOutput | tuple:
        """Generate images of the given classes.

        Args:
            class_labels: class ids (or names from ``id2label``), one per image.
            num_inference_steps: solver steps.
            guidance_scale: diffusers' meaning: 1 = no guidance, CFG = uncond + w (cond - uncond).
            guidance: ``None`` (CFG when ``guidance_scale > 1``), a name (``"cfg"``, ...) or a guider object.
            solver: ``None`` (the pipeline's scheduler), a solver name or a diffusers scheduler.
            teleport, teleport_fraction: closed-form jump over the first steps (see ``sample_loop``).
            guidance_space: ``"x0"`` (guide data predictions) or ``"model"`` (raw network output).
            generator: as in diffusers (a list gives one generator per image).
            seed: an int (seeds ``seed, seed+1, ...``) or a list: per-image generators, so an image
                depends on its seed and not on its batch.
            latents: initial noise instead of drawing it.
            timesteps: custom timesteps for schedulers that accept them.
            eta: DDIM eta.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            callback_on_step_end: ``fn(pipe, i, t, kwargs) -> dict`` after each step, as in diffusers;
                tensors named by ``callback_on_step_end_tensor_inputs`` (from ``_callback_tensor_inputs``).

        Returns:
            :class:`FastGenPipelineOutput` with ``images`` and ``nfe`` (network evaluations per image).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        bad = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs must be among {self._callback_tensor_inputs}, got {bad}.")
        guider, scheduler, teleport = self._fastgen_prepare(
            num_inference_steps=num_inference_steps, guidance=guidance, guidance_scale=guidance_scale,
            solver=solver, guidance_space=guidance_space, teleport=teleport, teleport_fraction=teleport_fraction,
        )
        device = self._execution_device  # walks every module: once per call
        labels = self._class_label_tensor(class_labels, device)
        batch_size = len(labels)
        if isinstance(teleport, ClassGaussianStats):  # per-class (and guided) jump for these labels
            teleport = teleport.for_labels(labels, guidance_scale=getattr(guider, "guidance_scale", 1.0) if guider else 1.0)
        generator = self._generators_from_seed(seed, generator, batch_size)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"generator must be one generator or a list of {batch_size} (one per image), got {len(generator)}.")

        net = self.network
        dtype = net.dtype
        size = net.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, net.config.in_channels, height, width)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} (batch, channels, height, width), got {tuple(latents.shape)}.")
        latents = latents.to(device=device, dtype=dtype)

        self._set_timesteps(scheduler, num_inference_steps, device, timesteps)
        latents = latents * scheduler.init_noise_sigma

        cond = {"class_labels": labels}
        uncond = {"class_labels": torch.full_like(labels, self.null_class_label)}
        self._interrupt = False
        result = self._denoise(
            net, scheduler, latents, scheduler.timesteps, cond, uncond, guider, guidance_space=guidance_space,
            generator=generator, eta=eta, teleport=teleport, teleport_fraction=teleport_fraction,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            callback_tensors={"class_labels": (lambda: cond["class_labels"], lambda v: cond.__setitem__("class_labels", v))},
        )
        images = self._decode(result.latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return FastGenPipelineOutput(images=images, nfe=result.nfe, steps=result.steps)

    def _decode(self, latents: torch.Tensor, output_type: str):
        if output_type == "latent":
            return latents
        if self.vae is not None:
            latents = latents / self.vae.config.scaling_factor
            images = self.vae.decode(latents.to(self.vae.dtype)).sample
        else:
            images = latents
        images = (images / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return images
        images = images.cpu().permute(0, 2, 3, 1).float().numpy()
        return self.numpy_to_pil(images) if output_type == "pil" else images


def _load_builtin_digits(path, **kwargs) -> FastGenClassPipeline:
    """``fastgen.load_builtin("digits")``: the built-in class-conditional digits model."""
    return FastGenClassPipeline.from_pretrained(path, **kwargs)
