"""FastGenStableDiffusionPipeline: Stable Diffusion 1.x/2.x with fastgen guidance, solvers and NFE."""
from typing import Any, Callable

import torch

from .common import quiet_transformers_import

with quiet_transformers_import():  # transformers warns that torchvision is absent; it is optional
    from diffusers import StableDiffusionPipeline

from .common import FastGenPipelineMixin, FastGenPipelineOutput


class FastGenStableDiffusionPipeline(FastGenPipelineMixin, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` whose denoising loop is fastgen's (Rombach et al. 2022, arXiv:2112.10752).

    Loads any standard SD 1.x/2.x folder (``.from_pretrained(path)``) or an existing pipeline
    (``.from_pipe(pipe)``). With ``guidance="cfg"`` (or ``None`` and ``guidance_scale > 1``) and the
    pipeline's own scheduler, outputs equal the stock pipeline's. Extra call arguments: ``guidance``,
    ``solver``, ``teleport``, ``teleport_fraction``, ``guidance_space``, ``seed``; the output has ``.nfe``.
    """

    _fastgen_entry = "fastgen_sd_pipeline"
    _callback_tensor_inputs = ["latents", "denoised", "prompt_embeds", "negative_prompt_embeds"]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
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
        """Text-to-image generation; arguments as ``StableDiffusionPipeline.__call__`` plus fastgen's.

        Args:
            guidance: ``None`` (CFG when ``guidance_scale > 1``), a name or a diffusers guider object.
            solver: ``None`` (``self.scheduler``), a solver name, or a diffusers scheduler.
            teleport, teleport_fraction: closed-form jump over the first share of steps.
            guidance_space: ``"x0"`` or ``"model"``: where guidance combines predictions.
            seed: int or list of ints: one generator per image (results independent of batch size).

        Returns:
            :class:`FastGenPipelineOutput` (``images``, ``nfe``, ``nsfw_content_detected``), or
            ``(images, nsfw_content_detected)`` with ``return_dict=False``.
        """
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        self.check_inputs(prompt, height, width, None, negative_prompt, prompt_embeds, negative_prompt_embeds,
                          ip_adapter_image, ip_adapter_image_embeds, callback_on_step_end_tensor_inputs)
        guider, scheduler, teleport = self._fastgen_prepare(
            num_inference_steps=num_inference_steps, guidance=guidance, guidance_scale=guidance_scale,
            solver=solver, guidance_space=guidance_space, teleport=teleport, teleport_fraction=teleport_fraction,
        )
        num_images = self._begin_text_call(
            guider=guider, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, clip_skip=clip_skip,
            cross_attention_kwargs=cross_attention_kwargs, prompt=prompt, prompt_embeds=prompt_embeds,
            num_images_per_prompt=num_images_per_prompt)
        generator = self._generators_from_seed(seed, generator, num_images)
        device = self._execution_device

        lora_scale = cross_attention_kwargs.get("scale", None) if cross_attention_kwargs is not None else None
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, guider is not None, negative_prompt,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=lora_scale, clip_skip=self.clip_skip,
        )
        cond: dict[str, Any] = {"encoder_hidden_states": prompt_embeds}
        uncond: dict[str, Any] | None = {"encoder_hidden_states": negative_prompt_embeds} if guider is not None else None
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            image_embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image, ip_adapter_image_embeds, device, num_images, guider is not None
            )
            self._add_ip_adapter_embeds(cond, uncond, image_embeds)

        timesteps, num_inference_steps = self._set_timesteps(scheduler, num_inference_steps, device, timesteps, sigmas)
        latents = self.prepare_latents(num_images, self.unet.config.in_channels, height, width,
                                       prompt_embeds.dtype, device, generator, latents)
        latents = self._rescale_init_noise(latents, scheduler)

        self._add_shared_conditions(cond, uncond, guidance_scale=guidance_scale, num_images=num_images, device=device,
                                    dtype=latents.dtype, cross_attention_kwargs=cross_attention_kwargs)

        self._num_timesteps = len(timesteps)
        result = self._denoise(
            self.unet, scheduler, latents, timesteps, cond, uncond, guider, guidance_space=guidance_space,
            generator=generator, eta=eta, teleport=teleport, teleport_fraction=teleport_fraction,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            callback_tensors={
                "prompt_embeds": (lambda: cond["encoder_hidden_states"], lambda v: cond.__setitem__("encoder_hidden_states", v)),
                "negative_prompt_embeds": (lambda: (uncond or {}).get("encoder_hidden_states"), lambda v: uncond.__setitem__("encoder_hidden_states", v) if uncond else None),
            },
        )
        latents = result.latents
        if output_type != "latent":
            image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
            image, has_nsfw_concept = self.run_safety_checker(image, device, prompt_embeds.dtype)
        else:
            image, has_nsfw_concept = latents, None
        do_denormalize = [True] * image.shape[0] if has_nsfw_concept is None else [not n for n in has_nsfw_concept]
        image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image, has_nsfw_concept)
        return FastGenPipelineOutput(images=image, nfe=result.nfe, nsfw_content_detected=has_nsfw_concept,
                                     steps=result.steps)
