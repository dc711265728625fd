"""Prophet's decode loop for full-sequence masked diffusion LMs (LLaDA-1, Dream style), for models that do not run
inside diffusers' ``LLaDA2Pipeline``.

Li et al., "Diffusion Language Models Know the Answer Before Decoding", arXiv:2508.19982; the loop follows LLaDA's
``generate`` (Nie et al. 2025) and the reference code's ``generate_earlyexit.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from diffusers.utils import BaseOutput

from .criterion import (
    DEFAULT_PHASE_BOUNDARIES,
    DEFAULT_THRESHOLDS,
    answer_start_from_constraints,
    mean_gap,
    phase_threshold,
    should_commit,
    validate_phase_boundaries,
    validate_thresholds,
)


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
