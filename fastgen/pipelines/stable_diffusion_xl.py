"""FastGenStableDiffusionXLPipeline: SDXL with fastgen guidance, solvers and NFE accounting."""
from typing import Any, Callable

import torch

from .common import quiet_transformers_import

with quiet_transformers_import():  # transformers warns that torchvision is absent; it is optional
    from diffusers import StableDiffusionXLPipeline

from .common import FastGenPipelineMixin, FastGenPipelineOutput


class FastGenStableDiffusionXLPipeline(FastGenPipelineMixin, StableDiffusionXLPipeline):
    """``StableDiffusionXLPipeline`` whose denoising loop is fastgen's (Podell et al. 2023, arXiv:2307.01952).

    Loads any standard SDXL folder or pipeline. With CFG and the pipeline's own scheduler the outputs
    equal the stock pipeline's. Extra call arguments as in :class:`FastGenStableDiffusionPipeline`.
    """

    _fastgen_entry = "fastgen_sdxl_pipeline"
    _callback_tensor_inputs = ["latents", "denoised", "prompt_embeds", "add_text_embeds", "add_time_ids"]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        guidance=None,
        solver=None,
        teleport: Callable | None = None,
        teleport_fraction: float = 0.0,
        guidance_space: str = "x0",
        seed: int | list[int] | None = None,
    ) -> FastGenPipelineOutput | tuple:
        """Text-to-image generation; arguments as ``StableDiffusionXLPipeline.__call__`` plus fastgen's
        (``guidance``, ``solver``, ``teleport``, ``teleport_fraction``, ``guidance_space``, ``seed``).

        Returns:
            :class:`FastGenPipelineOutput` with ``images`` and ``nfe``, or ``(images,)``.
        """
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        original_size = original_size or (height, width)
        target_size = target_size or (height, width)
        self.check_inputs(prompt, prompt_2, height, width, None, negative_prompt, negative_prompt_2, prompt_embeds,
                          negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
                          ip_adapter_image, ip_adapter_image_embeds, callback_on_step_end_tensor_inputs)
        guider, scheduler, teleport = self._fastgen_prepare(
            num_inference_steps=num_inference_steps, guidance=guidance, guidance_scale=guidance_scale,
            solver=solver, guidance_space=guidance_space, teleport=teleport, teleport_fraction=teleport_fraction,
        )
        num_images = self._begin_text_call(
            guider=guider, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, clip_skip=clip_skip,
            cross_attention_kwargs=cross_attention_kwargs, prompt=prompt, prompt_embeds=prompt_embeds,
            num_images_per_prompt=num_images_per_prompt, denoising_end=denoising_end)
        generator = self._generators_from_seed(seed, generator, num_images)
        device = self._execution_device
        do_cfg = guider is not None

        lora_scale = cross_attention_kwargs.get("scale", None) if cross_attention_kwargs is not None else None
        (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds) = self.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, device=device, num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=do_cfg, negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            lora_scale=lora_scale, clip_skip=self.clip_skip,
        )
        timesteps, num_inference_steps = self._set_timesteps(scheduler, num_inference_steps, device, timesteps, sigmas)
        latents = self.prepare_latents(num_images, self.unet.config.in_channels, height, width,
                                       prompt_embeds.dtype, device, generator, latents)
        latents = self._rescale_init_noise(latents, scheduler)

        projection_dim = (int(pooled_prompt_embeds.shape[-1]) if self.text_encoder_2 is None
                          else self.text_encoder_2.config.projection_dim)
        add_time_ids = self._get_add_time_ids(original_size, crops_coords_top_left, target_size,
                                              dtype=prompt_embeds.dtype, text_encoder_projection_dim=projection_dim)
        if negative_original_size is not None and negative_target_size is not None:
            negative_add_time_ids = self._get_add_time_ids(
                negative_original_size, negative_crops_coords_top_left, negative_target_size,
                dtype=prompt_embeds.dtype, text_encoder_projection_dim=projection_dim)
        else:
            negative_add_time_ids = add_time_ids

        def branch(embeds, pooled, time_ids):
            return {"encoder_hidden_states": embeds.to(device),
                    "added_cond_kwargs": {"text_embeds": pooled.to(device),
                                          "time_ids": time_ids.to(device).repeat(num_images, 1)}}

        cond = branch(prompt_embeds, pooled_prompt_embeds, add_time_ids)
        uncond = branch(negative_prompt_embeds, negative_pooled_prompt_embeds, negative_add_time_ids) if do_cfg else None
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            image_embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image, ip_adapter_image_embeds, device, num_images, do_cfg)
            self._add_ip_adapter_embeds(cond, uncond, image_embeds)

        if denoising_end is not None and 0 < denoising_end < 1:
            cutoff = int(round(scheduler.config.num_train_timesteps * (1 - denoising_end)))
            timesteps = timesteps[: len([t for t in timesteps if t >= cutoff])]
        self._add_shared_conditions(cond, uncond, guidance_scale=guidance_scale, num_images=num_images, device=device,
                                    dtype=latents.dtype, cross_attention_kwargs=cross_attention_kwargs)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)

        self._num_timesteps = len(timesteps)
        result = self._denoise(
            self.unet, scheduler, latents, timesteps, cond, uncond, guider, guidance_space=guidance_space,
            generator=generator, eta=eta, teleport=teleport, teleport_fraction=teleport_fraction,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            callback_tensors={
                "prompt_embeds": (lambda: cond["encoder_hidden_states"], lambda v: cond.__setitem__("encoder_hidden_states", v)),
                "add_text_embeds": (lambda: cond["added_cond_kwargs"]["text_embeds"], lambda v: cond["added_cond_kwargs"].__setitem__("text_embeds", v)),
                "add_time_ids": (lambda: cond["added_cond_kwargs"]["time_ids"], lambda v: cond["added_cond_kwargs"].__setitem__("time_ids", v)),
            },
        )
        image = self._decode_latents(result.latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return FastGenPipelineOutput(images=image, nfe=result.nfe, steps=result.steps)

    def _decode_latents(self, latents: torch.Tensor, output_type: str):
        """VAE decode with SDXL's fp16 upcast and latents mean/std handling, then post-processing."""
        if output_type == "latent":
            return latents
        needs_upcasting = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if needs_upcasting:
            self.upcast_vae()
            latents = latents.to(next(iter(self.vae.post_quant_conv.parameters())).dtype)
        mean, std = getattr(self.vae.config, "latents_mean", None), getattr(self.vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / self.vae.config.scaling_factor + mean
        else:
            latents = latents / self.vae.config.scaling_factor
        image = self.vae.decode(latents.to(self.vae.device), return_dict=False)[0]
        if needs_upcasting:
            self.vae.to(dtype=torch.float16)
        if self.watermark is not None:
            image = self.watermark.apply_watermark(image)
        return self.image_processor.postprocess(image, output_type=output_type)
