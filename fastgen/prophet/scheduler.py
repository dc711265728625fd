"""``ProphetScheduler``: Prophet early commit as a diffusers ``BlockRefinementScheduler`` for ``LLaDA2Pipeline``.

Li et al., "Diffusion Language Models Know the Answer Before Decoding", arXiv:2508.19982.
"""
from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_block_refinement import (
    BlockRefinementScheduler,
    BlockRefinementSchedulerOutput,
)

from .criterion import (
    DEFAULT_PHASE_BOUNDARIES,
    DEFAULT_THRESHOLDS,
    PROGRESS_MODES,
    mean_gap,
    phase_threshold,
    should_commit,
    validate_phase_boundaries,
    validate_thresholds,
)


class ProphetScheduler(BlockRefinementScheduler):
    r"""Block refinement with Prophet early commit, a drop-in scheduler for diffusers' ``LLaDA2Pipeline``.

    Implements the early-commit rule of Li et al., *Diffusion Language Models Know the Answer Before Decoding*
    (arXiv:2508.19982), for semi-autoregressive block diffusion. At every refinement step, before this step's commits
    and on the same logits, the top-1/top-2 logit gap is averaged over the monitored positions of the active block:

        g = mean_i (l_i^(1) - l_i^(2)),   commit everything if g >= tau(progress),

    with tau = ``early_threshold`` while progress < ``early_phase_end``, ``mid_threshold`` while progress <
    ``mid_phase_end`` and ``late_threshold`` after (defaults 7.5 / 5.0 / 2.5 at 0.33 / 0.67, as in the reference
    code). On a trigger every still-masked position of the block takes the token sampled in this step (the argmax at
    temperature 0, otherwise the same multinomial draw the stock rule uses; nothing is resampled), so the commit costs
    no extra forward, and the block ends at once instead of paying ``LLaDA2Pipeline``'s extra post-block forward.
    Rows of a batch decide independently; rows that did not trigger follow the stock ``BlockRefinementScheduler``
    rule, which also runs unchanged (same tokens, same random draws) whenever Prophet does not fire. With all
    thresholds at ``+inf`` the scheduler is token-for-token the stock one.

    Deviations from the paper's whole-sequence setting, forced by block diffusion (``LLaDA2Pipeline`` never feeds
    future blocks to the model):

    - the commit covers the active block; ``commit_later_blocks=True`` additionally commits each later block of a
      triggered row in its first step (1 NFE per later block), the closest analogue of the paper's "fill every
      remaining mask";
    - by default the monitored positions are the still-masked positions of the active block (the reference code
      averages a fixed answer span whether or not it is masked; use ``answer_start``/``answer_length`` for that, in
      tokens from the start of the generation; blocks that do not overlap the span fall back to the default);
    - ``progress_mode="block"`` (default) measures progress within the block, (step + 1) / steps per block;
      ``"global"`` uses the 1-based step count over the whole generation as the paper does, and needs
      :meth:`set_total_steps` (``LLaDA2Pipeline.num_timesteps``) before the pipeline call.

    A block filled by Prophet is frozen: with editing enabled (``editing_threshold`` > 0) its tokens are not edited.

    Args:
        block_length (`int`, defaults to 32): tokens per block (as in ``BlockRefinementScheduler``).
        num_inference_steps (`int`, defaults to 32): refinement steps per block.
        threshold (`float`, defaults to 0.95): stock confidence threshold for committing tokens.
        editing_threshold (`float`, *optional*): stock editing threshold (None/<=0 disables editing).
        minimal_topk (`int`, defaults to 1): stock minimum commits per step.
        early_threshold (`float`, defaults to 7.5): gap threshold tau in the early phase.
        mid_threshold (`float`, defaults to 5.0): gap threshold in the middle phase.
        late_threshold (`float`, defaults to 2.5): gap threshold in the late phase.
        early_phase_end (`float`, defaults to 0.33): progress at which the middle phase starts.
        mid_phase_end (`float`, defaults to 0.67): progress at which the late phase starts.
        progress_mode (`str`, defaults to `"block"`): `"block"` or `"global"` (see above).
        answer_start (`int`, *optional*): first monitored position, counted from the start of the generation.
        answer_length (`int`, defaults to 5): monitored span length when ``answer_start`` is set (reference: 5).
        commit_later_blocks (`bool`, defaults to `False`): after a trigger, commit later blocks in one step each.
        stop_finished_blocks (`bool`, defaults to `False`): also skip the pipeline's post-block forward when the
            stock rule (not Prophet) empties a block early and editing is off; that forward cannot change any token.
            Off by default so that, whenever Prophet does not fire, forward count and random draws (temperature > 0
            samples in that forward too) are exactly the stock ones.
    """

    _compatibles = ["BlockRefinementScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        block_length: int = 32,
        num_inference_steps: int = 32,
        threshold: float = 0.95,
        editing_threshold: float | None = None,
        minimal_topk: int = 1,
        early_threshold: float = DEFAULT_THRESHOLDS[0],
        mid_threshold: float = DEFAULT_THRESHOLDS[1],
        late_threshold: float = DEFAULT_THRESHOLDS[2],
        early_phase_end: float = DEFAULT_PHASE_BOUNDARIES[0],
        mid_phase_end: float = DEFAULT_PHASE_BOUNDARIES[1],
        progress_mode: str = "block",
        answer_start: int | None = None,
        answer_length: int = 5,
        commit_later_blocks: bool = False,
        stop_finished_blocks: bool = False,
    ):
        validate_thresholds((early_threshold, mid_threshold, late_threshold), name="thresholds (early, mid, late)")
        validate_phase_boundaries((early_phase_end, mid_phase_end), name="(early_phase_end, mid_phase_end)")
        if progress_mode not in PROGRESS_MODES:
            raise ValueError(f"progress_mode must be one of {list(PROGRESS_MODES)}, got {progress_mode!r}.")
        if answer_start is not None and (not isinstance(answer_start, int) or answer_start < 0):
            raise ValueError(f"answer_start must be None or an int >= 0, got {answer_start!r}.")
        if not isinstance(answer_length, int) or answer_length < 1:
            raise ValueError(f"answer_length must be an int >= 1, got {answer_length!r}.")
        if not isinstance(block_length, int) or block_length < 1:
            raise ValueError(f"block_length must be an int >= 1, got {block_length!r}.")
        super().__init__(
            block_length=block_length,
            num_inference_steps=num_inference_steps,
            threshold=threshold,
            editing_threshold=editing_threshold,
            minimal_topk=minimal_topk,
        )
        self._total_steps: int | None = None
        self._block_length_now = block_length
        self._reset_generation()

    # --- state -------------------------------------------------------------------------------------------------

    def _reset_generation(self) -> None:
        self._block_index = -1  # index of the active block among the generated (non-prefill) blocks
        self._gen_offset = 0  # prompt tokens inside the first generated block
        self._global_step = 0  # 1-based count of refinement steps taken (steps with masks left)
        self._fired: torch.BoolTensor | None = None  # rows that triggered at some point of this generation
        self._filled: torch.BoolTensor | None = None  # rows that Prophet filled in the active block (frozen)
        self._open: torch.BoolTensor | None = None  # rows whose active block still had masks after the last step
        self.fired_at: list[int | None] = []  # per row: global step of the first trigger (1-based), or None
        self.fired_block: list[int | None] = []  # per row: block index of the first trigger

    @property
    def thresholds(self) -> tuple[float, float, float]:
        c = self.config
        return (float(c.early_threshold), float(c.mid_threshold), float(c.late_threshold))

    def set_total_steps(self, total_steps: int | None) -> None:
        """Total refinement steps of a generation, for ``progress_mode="global"`` (kept across pipeline calls)."""
        if total_steps is not None and (not isinstance(total_steps, int) or total_steps < 1):
            raise ValueError(f"total_steps must be None or an int >= 1, got {total_steps!r}.")
        self._total_steps = total_steps

    def set_timesteps(
        self,
        num_inference_steps: int,
        device: str | torch.device | None = None,
        block_length: int | None = None,
    ) -> None:
        """Stock ``set_timesteps``; also starts a new generation (clears the Prophet state)."""
        if self.config.progress_mode == "global" and self._total_steps is None:
            raise ValueError(
                "progress_mode='global' needs the generation's total step count: call "
                "scheduler.set_total_steps(num_inference_steps * number_of_generated_blocks) first, or use "
                "progress_mode='block'."
            )
        super().set_timesteps(num_inference_steps, device=device, block_length=block_length)
        self._block_length_now = block_length if block_length is not None else self.config.block_length
        self._reset_generation()

    def _start_block(self, batch_size: int, prompt_mask: torch.BoolTensor | None, device) -> None:
        self._block_index += 1
        if self._block_index == 0:
            self._gen_offset = int(prompt_mask.sum().item()) if prompt_mask is not None else 0
        if self._fired is None or self._fired.shape[0] != batch_size:
            self._fired = torch.zeros(batch_size, dtype=torch.bool, device=device)
            self.fired_at = [None] * batch_size
            self.fired_block = [None] * batch_size
        self._filled = torch.zeros(batch_size, dtype=torch.bool, device=device)

    def _progress(self, step_index: int) -> float:
        if self.config.progress_mode == "global":
            return self._global_step / float(self._total_steps)
        return (step_index + 1) / float(self.num_inference_steps)

    def _monitor_mask(self, active: torch.BoolTensor) -> torch.BoolTensor:
        """Monitored positions of the active block: the answer span where it overlaps the block, else the masks."""
        start = self.config.answer_start
        if start is None:
            return active
        block_len = active.shape[1]
        first = self._block_index * block_len - self._gen_offset  # generation index of block position 0
        lo, hi = max(start - first, 0), min(start + self.config.answer_length - first, block_len)
        if lo >= hi:
            return active
        span = torch.zeros_like(active)
        span[:, lo:hi] = True
        return span

    # --- stepping ----------------------------------------------------------------------------------------------

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.LongTensor,
        *,
        mask_token_id: int | None = None,
        temperature: float = 0.0,
        top_p: float | None = None,
        top_k: int | None = None,
        sampling_method: str = "auto",
        threshold: float | None = None,
        editing_threshold: float | None = None,
        minimal_topk: int | None = None,
        prompt_mask: torch.BoolTensor | None = None,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> BlockRefinementSchedulerOutput | tuple:
        """Stock refinement step, then the Prophet check on the same logits (see the class docstring)."""
        if mask_token_id is None:
            raise ValueError(
                "mask_token_id is required by ProphetScheduler (it decodes by unmasking); pass mask_token_id=<the "
                "tokenizer's mask token id>. The uniform-corruption mode (mask_token_id=None) is not supported."
            )
        step_index = int(timestep.item()) if isinstance(timestep, torch.Tensor) else int(timestep)
        active = sample == mask_token_id
        row_active = active.any(dim=-1)
        has_masks = bool(row_active.any())
        if self._filled is None or (step_index == 0 and has_masks):
            self._start_block(sample.shape[0], prompt_mask, sample.device)
        if has_masks:
            self._global_step += 1

        # The stock rule runs first and unchanged, so random draws and non-triggered rows match the parent exactly.
        out = super().step(
            model_output, timestep, sample, mask_token_id=mask_token_id, temperature=temperature, top_p=top_p,
            top_k=top_k, sampling_method=sampling_method, threshold=threshold, editing_threshold=editing_threshold,
            minimal_topk=minimal_topk, prompt_mask=prompt_mask, generator=generator, return_dict=True,
        )
        prev_sample, transfer_index = out.prev_sample, out.transfer_index
        editing_index = out.editing_transfer_index

        fire = torch.zeros_like(row_active)
        if has_masks:
            tau = phase_threshold(self._progress(step_index), self.thresholds,
                                  (self.config.early_phase_end, self.config.mid_phase_end))
            gap = mean_gap(model_output, self._monitor_mask(active))
            fire = should_commit(gap, tau) & row_active & ~self._filled
            if self.config.commit_later_blocks and step_index == 0:
                fire = fire | (self._fired & row_active)  # "all in": later blocks of a triggered row, first step
        frozen = self._filled | fire
        if bool(frozen.any()):
            rows = frozen[:, None]
            # Triggered rows: every masked position takes this step's sampled token; filled rows are never edited.
            prev_sample = torch.where(rows, torch.where(active, out.sampled_tokens, sample), prev_sample)
            transfer_index = torch.where(rows, active, transfer_index)
            editing_index = editing_index & ~rows
            for b in torch.nonzero(fire & ~self._fired).flatten().tolist():
                self.fired_at[b] = self._global_step
                self.fired_block[b] = self._block_index
            self._fired = self._fired | fire
            self._filled = frozen
        self._open = (prev_sample == mask_token_id).any(dim=-1)

        if not return_dict:
            return prev_sample, transfer_index, editing_index, out.sampled_tokens, out.sampled_probs, model_output
        return BlockRefinementSchedulerOutput(
            prev_sample=prev_sample,
            transfer_index=transfer_index,
            editing_transfer_index=editing_index,
            sampled_tokens=out.sampled_tokens,
            sampled_probs=out.sampled_probs,
            pred_logits=model_output,
        )

    def check_block_should_continue(
        self,
        step_idx: int,
        masks_remaining: bool,
        editing_enabled: bool,
        editing_transfer_index: torch.BoolTensor,
        post_steps: int,
        max_post_steps: int,
        finished: torch.BoolTensor,
    ) -> bool:
        """Stock rule, except that a block emptied by the last step ends now (no wasted post-block forward) when
        every unfinished row was filled by Prophet, or when editing is off and ``stop_finished_blocks`` is set."""
        if not super().check_block_should_continue(
            step_idx, masks_remaining, editing_enabled, editing_transfer_index, post_steps, max_post_steps, finished
        ):
            return False
        if not masks_remaining or self._open is None:
            return True  # post-block editing steps: the stock rule decides (filled rows are frozen in step())
        unfinished = ~finished.to(self._open.device)
        if bool((self._open & unfinished).any()):
            return True  # masks left in some row: keep refining
        all_filled = bool((self._filled | ~unfinished).all())
        if all_filled or (self.config.stop_finished_blocks and not editing_enabled):
            return False
        return True


# Saved pipelines name the scheduler's module in model_index.json (["fastgen.prophet", "ProphetScheduler"]): keep the
# public path, not the file the class lives in, so folders saved before and after the split into a package load alike.
ProphetScheduler.__module__ = "fastgen.prophet"
