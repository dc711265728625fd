"""Prophet: early-commit decoding for masked diffusion language models.

Li et al., "Diffusion Language Models Know the Answer Before Decoding", arXiv:2508.19982.

A masked diffusion LM usually "knows" its answer long before the last refinement step. Prophet watches the gap between
the top-1 and top-2 logits; once the gap averaged over the monitored positions clears a threshold that falls as
decoding progresses (7.5 / 5.0 / 2.5 by default), every remaining mask is committed to the current argmax at once.
The decision reuses the logits of the step's forward pass, so it costs no extra forward evaluation (NFE).

Contents:

- criterion helpers shared by everything below: :func:`top2_gap`, :func:`mean_gap`, :func:`phase_threshold`,
  :func:`validate_thresholds`;
- :class:`ProphetScheduler`, a drop-in ``BlockRefinementScheduler`` for diffusers' ``LLaDA2Pipeline``
  (semi-autoregressive block diffusion);
- :func:`prophet_generate`, a decode loop for LLaDA-1 / Dream style full-sequence masked diffusion LMs;
- :class:`NFECounter`, exact forward-pass counting by a hook on the model;
- :func:`load_builtin_dlm` and the synthetic task of the built-in ``arith-dlm`` model.
"""
from __future__ import annotations

import math
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config  # noqa: F401  (by name: loader lookup)
from diffusers.schedulers.scheduling_block_refinement import (
    BlockRefinementScheduler,
    BlockRefinementSchedulerOutput,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401  (by name: diffusers' loader needs it)
from diffusers.utils import BaseOutput

DEFAULT_THRESHOLDS = (7.5, 5.0, 2.5)
# The reference implementation switches phases at progress 0.33 and 0.67 (progress = 1-based step / total steps).
DEFAULT_PHASE_BOUNDARIES = (0.33, 0.67)
PROGRESS_MODES = ("block", "global")

# --------------------------------------------------------------------------------------------------------------------
# Criterion
# --------------------------------------------------------------------------------------------------------------------


def validate_thresholds(thresholds: Sequence[float], name: str = "thresholds") -> tuple[float, float, float]:
    """Check (early, mid, late) gap thresholds: three numbers, no NaN, non-increasing (+-inf allowed)."""
    try:
        values = tuple(float(v) for v in thresholds)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be three numbers (early, mid, late), got {thresholds!r}.") from None
    if len(values) != 3:
        raise ValueError(f"{name} must be three numbers (early, mid, late), got {len(values)}: {thresholds!r}.")
    if any(math.isnan(v) for v in values):
        raise ValueError(f"{name} must not contain NaN, got {thresholds!r}.")
    if not values[0] >= values[1] >= values[2]:
        raise ValueError(
            f"{name} must be non-increasing (early >= mid >= late, e.g. 7.5 5.0 2.5; +inf/-inf allowed), "
            f"got {thresholds!r}."
        )
    return values


def validate_phase_boundaries(boundaries: Sequence[float], name: str = "phase_boundaries") -> tuple[float, float]:
    """Check the two progress values where the early and mid phases end: 0 <= first <= second <= 1."""
    try:
        values = tuple(float(v) for v in boundaries)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be two numbers in [0, 1], got {boundaries!r}.") from None
    if len(values) != 2 or not 0.0 <= values[0] <= values[1] <= 1.0:
        raise ValueError(f"{name} must be two increasing numbers in [0, 1] (e.g. 0.33 0.67), got {boundaries!r}.")
    return values


def phase_threshold(
    progress: float,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    boundaries: Sequence[float] = DEFAULT_PHASE_BOUNDARIES,
) -> float:
    """tau(progress): early threshold while progress < boundaries[0], mid while < boundaries[1], late after."""
    if progress < boundaries[0]:
        return float(thresholds[0])
    if progress < boundaries[1]:
        return float(thresholds[1])
    return float(thresholds[2])


def top2_gap(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 logit over the last axis (= the log-probability gap; the softmax normaliser cancels)."""
    top = torch.topk(logits.float(), k=2, dim=-1).values
    return top[..., 0] - top[..., 1]


def mean_gap(logits: torch.Tensor, monitor: torch.Tensor) -> torch.Tensor:
    """Mean top-2 gap per row over the positions where ``monitor`` is True; NaN for rows with none (never fires).

    Args:
        logits: ``[batch, length, vocab]``.
        monitor: ``[batch, length]`` or ``[length]`` booleans.
    """
    gap = top2_gap(logits)
    monitor = monitor.to(device=gap.device, dtype=torch.bool).expand_as(gap)
    count = monitor.sum(dim=-1)
    total = torch.where(monitor, gap, torch.zeros_like(gap)).sum(dim=-1)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))


def should_commit(gap: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per-row decision ``gap >= threshold`` (NaN, i.e. nothing monitored, is False)."""
    return gap >= threshold


# --------------------------------------------------------------------------------------------------------------------
# Forward counting
# --------------------------------------------------------------------------------------------------------------------


class NFECounter:
    """Counts forward passes of a ``torch.nn.Module`` with a forward hook (one call = one NFE, whatever the batch).

    Use as a context manager: ``with NFECounter(pipe.model) as nfe: pipe(...)``; then ``nfe.count``.
    """

    def __init__(self, model: torch.nn.Module):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        self.model = model
        self.count = 0
        self._handle = None

    def _hook(self, module, args, output):
        self.count += 1

    def __enter__(self) -> "NFECounter":
        self.count = 0
        self._handle = self.model.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


# --------------------------------------------------------------------------------------------------------------------
# Built-in synthetic task (the "arith-dlm" model is trained and evaluated on it)
# --------------------------------------------------------------------------------------------------------------------

ARITH_ANSWER_PREFIX = "The answer is "
ARITH_WORDS = ("What", "Which", "is", "larger", "or", "The", "answer")


def _random_number(rng: random.Random, max_digits: int) -> int:
    """A number whose digit count is uniform in 1..max_digits (so short and long operands are equally common)."""
    digits = rng.randint(1, max_digits)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def arith_is_heldout(kind: str, a: int, b: int) -> bool:
    """Deterministic 10% split: held-out problems are never seen in training."""
    return zlib.crc32(f"{kind}:{a}:{b}".encode()) % 10 == 0


def arith_problem(rng: random.Random) -> dict:
    """One problem of the built-in task: addition of 1-2 digit numbers (60%) or comparison of 1-3 digit ones (40%)."""
    if rng.random() < 0.6:
        a, b = _random_number(rng, 2), _random_number(rng, 2)
        kind, prompt, answer = "add", f"What is {a}+{b}? ", str(a + b)
    else:
        a, b = _random_number(rng, 3), _random_number(rng, 3)
        while b == a:
            b = _random_number(rng, 3)
        kind, prompt, answer = "compare", f"Which is larger, {a} or {b}? ", str(max(a, b))
    return {
        "kind": kind,
        "a": a,
        "b": b,
        "prompt": prompt,
        "answer": answer,
        "completion": f"{ARITH_ANSWER_PREFIX}{answer}.",
    }


def arith_problems(n: int, *, split: str = "test", seed: int = 0) -> list[dict]:
    """``n`` distinct problems from the ``"train"`` or held-out ``"test"`` split, reproducible from ``seed``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}.")
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        p = arith_problem(rng)
        key = (p["kind"], p["a"], p["b"])
        if arith_is_heldout(*key) != (split == "test") or (split == "test" and key in seen):
            continue
        seen.add(key)
        out.append(p)
    return out


def arith_extract_answer(text: str) -> str | None:
    """The number after the last "The answer is" in ``text``, or None."""
    idx = text.rfind(ARITH_ANSWER_PREFIX)
    if idx < 0:
        return None
    rest = text[idx + len(ARITH_ANSWER_PREFIX):]
    digits = ""
    for ch in rest:
        if not ch.isdigit():
            break
        digits += ch
    return digits or None
# --------------------------------------------------------------------------------------------------------------------
# diffusers scheduler for LLaDA2Pipeline (block diffusion)
# --------------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------------
# Generic decode loop for full-sequence masked diffusion LMs (LLaDA-1, Dream)
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ProphetGenerateOutput(BaseOutput):
    """Output of :func:`prophet_generate`.

    Args:
        sequences: ``[batch, prompt + gen_length]`` token ids (prompt included).
        nfe: forward passes run (one per loop iteration, whatever the batch size).
        nfe_per_row: forward passes each row needed (until its last mask was committed).
        fired_at: per row, the 1-based global step at which Prophet committed everything, or None.
        total_steps: the step budget (``steps``).
    """

    sequences: torch.LongTensor
    nfe: int
    nfe_per_row: list[int]
    fired_at: list[int | None]
    total_steps: int


def _gumbel_argmax(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """argmax at temperature 0; otherwise the Gumbel-max sample argmax(exp(l) / (-log u)^T) in float64 (as LLaDA)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.to(torch.float64)
    noise = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
    return (logits.exp() / (-torch.log(noise)) ** temperature).argmax(dim=-1)


def _transfer_counts(block_masks: torch.BoolTensor, steps: int) -> torch.LongTensor:
    """Tokens to commit per step and row: the block's masks spread evenly over ``steps`` (remainder first)."""
    n = block_masks.sum(dim=1, keepdim=True)
    counts = (n // steps).repeat(1, steps)
    remainder = n % steps
    counts += (torch.arange(steps, device=n.device)[None, :] < remainder).long()
    return counts


def answer_start_from_constraints(constraints: dict[int, int]) -> int:
    """Reference rule: the answer starts 2 positions after the last forced anchor token (e.g. "... is" + space)."""
    return max(int(p) for p in constraints) + 2


def validate_generation_args(gen_length: int, block_length: int, steps: int) -> int:
    """Check the LLaDA-style layout; returns steps per block."""
    for name, value in (("gen_length", gen_length), ("block_length", block_length), ("steps", steps)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    if gen_length % block_length:
        raise ValueError(
            f"gen_length must be a multiple of block_length: got gen_length={gen_length}, "
            f"block_length={block_length}."
        )
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(
            f"steps must be a multiple of the number of blocks (gen_length / block_length = {num_blocks}), "
            f"got steps={steps}."
        )
    return steps // num_blocks


@torch.no_grad()
def prophet_generate(
    model: Callable[..., Any],
    input_ids: torch.LongTensor,
    *,
    mask_token_id: int | None,
    gen_length: int = 256,
    block_length: int = 32,
    steps: int = 256,
    prophet: bool = True,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    phase_boundaries: Sequence[float] = DEFAULT_PHASE_BOUNDARIES,
    answer_start: int | None = None,
    answer_length: int = 5,
    constraints: dict[int, int] | None = None,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    attention_mask: torch.LongTensor | None = None,
    shift_logits: bool = False,
    generator: torch.Generator | None = None,
) -> ProphetGenerateOutput:
    """Semi-autoregressive masked-diffusion decoding (LLaDA's ``generate``) with Prophet early commit.

    The whole sequence (prompt + ``gen_length`` masks) is fed at every step; blocks of ``block_length`` are unmasked
    left to right with ``steps / num_blocks`` steps each, committing the most confident predictions of the block
    (``remasking="low_confidence"``) or random ones (``"random"``). With ``prophet=True``, before each step's commit
    the top-2 logit gap is averaged over the monitored positions (the answer span ``[answer_start, answer_start +
    answer_length)`` of the generation, masked or not, as in the reference code; by default the still-masked
    positions of the active block) and compared with tau(global_step / steps), global_step 1-based. A row that
    triggers commits every remaining mask of the whole sequence, future blocks included, to this step's prediction
    and stops; other rows go on.

    Args:
        model: callable returning an object with ``.logits`` of shape ``[batch, length, vocab]`` (a transformers
            model, e.g. LLaDA-8B loaded with ``trust_remote_code=True``).
        input_ids: ``[batch, prompt]`` prompt ids (left-pad with ``attention_mask`` for batches of unequal prompts).
        mask_token_id: the model's mask token id (LLaDA: 126336).
        constraints: ``{generation position: token id}`` forced after every step (the reference code anchors the
            answer with e.g. "The answer is" this way); ``answer_start`` defaults to max(position) + 2 then.
        attention_mask: ``[batch, prompt]``; when given, the model is called with the mask extended over the
            generation, otherwise with the ids only (LLaDA-1 takes no mask).
        shift_logits: True for Dream-style models whose logits at i predict token i + 1.
    """
    if mask_token_id is None:
        raise ValueError("mask_token_id is required (the model's mask token id, e.g. 126336 for LLaDA).")
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.dtype != torch.long:
        raise ValueError("input_ids must be a [batch, prompt_length] int64 tensor.")
    steps_per_block = validate_generation_args(gen_length, block_length, steps)
    thresholds = validate_thresholds(thresholds)
    boundaries = validate_phase_boundaries(phase_boundaries)
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"remasking must be 'low_confidence' or 'random', got {remasking!r}.")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}.")
    constraints = dict(constraints or {})
    for pos in constraints:
        if not 0 <= int(pos) < gen_length:
            raise ValueError(f"constraints positions must be in [0, gen_length={gen_length}), got {pos}.")
    if answer_start is None and constraints:
        answer_start = answer_start_from_constraints(constraints)
    if answer_start is not None and not 0 <= answer_start < gen_length:
        raise ValueError(f"answer_start must be in [0, gen_length={gen_length}), got {answer_start}.")

    batch, prompt_len = input_ids.shape
    device = input_ids.device
    x = torch.full((batch, prompt_len + gen_length), mask_token_id, dtype=torch.long, device=device)
    x[:, :prompt_len] = input_ids
    full_mask = None
    if attention_mask is not None:
        full_mask = torch.cat([attention_mask.to(device), torch.ones(batch, gen_length, dtype=attention_mask.dtype,
                                                                      device=device)], dim=1)

    def impose_constraints() -> None:
        for pos, tok in constraints.items():
            x[:, prompt_len + int(pos)] = int(tok)

    impose_constraints()
    monitored_span = None
    if answer_start is not None:
        monitored_span = torch.zeros(prompt_len + gen_length, dtype=torch.bool, device=device)
        monitored_span[prompt_len + answer_start: prompt_len + answer_start + answer_length] = True

    nfe, global_step = 0, 0
    nfe_per_row = [0] * batch
    fired_at: list[int | None] = [None] * batch
    for block in range(gen_length // block_length):
        lo, hi = prompt_len + block * block_length, prompt_len + (block + 1) * block_length
        counts = _transfer_counts(x[:, lo:hi] == mask_token_id, steps_per_block)
        for i in range(steps_per_block):
            masked = x == mask_token_id
            open_rows = masked.any(dim=1)
            if not bool(open_rows.any()):
                break
            out = model(x, attention_mask=full_mask) if full_mask is not None else model(x)
            logits = out.logits if hasattr(out, "logits") else out
            if shift_logits:
                logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
            nfe += 1
            global_step += 1
            for b in torch.nonzero(open_rows).flatten().tolist():
                nfe_per_row[b] += 1
            x0 = _gumbel_argmax(logits, temperature, generator)

            in_block = in_block_mask(masked, lo, hi)
            fire = torch.zeros_like(open_rows)
            if prophet:
                monitor = monitored_span if monitored_span is not None else masked & in_block
                tau = phase_threshold(global_step / steps, thresholds, boundaries)
                fire = should_commit(mean_gap(logits, monitor), tau) & open_rows
                if bool(fire.any()):  # go all in: every mask of the row, future blocks included
                    x = torch.where(fire[:, None] & masked, x0, x)
                    for b in torch.nonzero(fire).flatten().tolist():
                        fired_at[b] = global_step

            if remasking == "low_confidence":
                probs = torch.softmax(logits.float(), dim=-1)
                confidence = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
            else:
                confidence = torch.rand(x0.shape, generator=generator, device=device)
            candidates = masked & in_block
            confidence = torch.where(candidates, confidence, float("-inf"))
            commit = torch.zeros_like(masked)
            for b in range(batch):
                k = min(int(counts[b, i]), int(candidates[b].sum()))
                if fire[b] or k == 0:
                    continue
                commit[b, torch.topk(confidence[b], k=k).indices] = True
            x = torch.where(commit, x0, x)
            impose_constraints()
    return ProphetGenerateOutput(sequences=x, nfe=nfe, nfe_per_row=nfe_per_row, fired_at=fired_at,
                                 total_steps=steps)


def in_block_mask(like: torch.Tensor, lo: int, hi: int) -> torch.BoolTensor:
    """Boolean mask of the columns [lo, hi) with the shape of ``like``."""
    out = torch.zeros(like.shape, dtype=torch.bool, device=like.device)
    out[:, lo:hi] = True
    return out


# --------------------------------------------------------------------------------------------------------------------
# Built-in model
# --------------------------------------------------------------------------------------------------------------------


def load_builtin_dlm(path: str | Path, *, prophet: bool = True, device: str | torch.device | None = None,
                     **scheduler_kwargs):
    """Load the built-in ``arith-dlm`` folder into a diffusers ``LLaDA2Pipeline``.

    The scheduler is a :class:`ProphetScheduler` (``prophet=True``, config overrides in ``scheduler_kwargs``, e.g.
    ``early_threshold=...``) or the stock ``BlockRefinementScheduler`` (``prophet=False``). Weights load from
    safetensors only.
    """
    from diffusers import LLaDA2Pipeline
    from transformers import AutoModelForMaskedLM, PreTrainedTokenizerFast

    path = Path(path)
    for sub in ("model", "scheduler", "tokenizer"):
        if not (path / sub).is_dir():
            raise FileNotFoundError(f"{path} is not an arith-dlm folder: missing {sub}/.")
    if not prophet and scheduler_kwargs:
        raise ValueError(f"scheduler options {sorted(scheduler_kwargs)} need prophet=True.")
    import inspect

    accepted = set(inspect.signature(ProphetScheduler.__init__).parameters) - {"self"}
    unknown = sorted(set(scheduler_kwargs) - accepted)
    if unknown:
        raise ValueError(f"unknown ProphetScheduler options {unknown}; accepted: {sorted(accepted)}.")
    model = AutoModelForMaskedLM.from_pretrained(path / "model", use_safetensors=True)
    model.eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path / "tokenizer")
    base_config = BlockRefinementScheduler.load_config(path / "scheduler")
    if prophet:
        scheduler = ProphetScheduler.from_config(base_config, **scheduler_kwargs)
    else:
        scheduler = BlockRefinementScheduler.from_config(base_config)
    pipe = LLaDA2Pipeline(model=model, scheduler=scheduler, tokenizer=tokenizer)
    if device is not None:
        pipe.to(device)
    return pipe
