"""Train the built-in tiny masked diffusion LM ``arith-dlm`` (used by Prophet's tests, CLI and benchmark).

Task: "What is 47+58? " -> "The answer is 105." and "Which is larger, 312 or 98? " -> "The answer is 312."
(see ``fastgen.prophet.arith.arith_problem``; 10% of all problems are held out by a fixed hash and never trained on).

Objective (LLaDA, Nie et al. 2025): t ~ U(0, 1], every generated token is masked with probability t, cross-entropy
on the masked tokens weighted by 1/t (capped at 10, see ``make_batch``); prompt tokens are never masked. The generation is the completion followed by
EOS padding. So that the same network also runs inside diffusers' ``LLaDA2Pipeline`` (which feeds the prompt, the
committed blocks and the current block only, with an attention-masked tail past ``prompt + gen_length``), half of
the examples are cut at a random block boundary: tokens before the current block are clean, the current block is
masked with probability t, later tokens are dropped, and positions past the generation are mask tokens hidden from
attention whose target is EOS.

Network: ``transformers.BertForMaskedLM`` built from a config (bidirectional attention, accepts ``attention_mask``
and ``position_ids``), with a word/digit-level ``PreTrainedTokenizerFast`` written here.

    PYTHONPATH=. python scripts/train_arith_dlm.py --out fastgen/assets/arith-dlm --max-seconds 1800
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fastgen.prophet.arith import (
    ARITH_WORDS,
    arith_extract_answer,
    arith_is_heldout,
    arith_problem,
    arith_problems,
)

GEN_REGION = 24  # generated tokens per training example (completion + EOS padding)
BLOCK_CHOICES = (4, 8, 16, 32)


def build_tokenizer():
    """Word/digit-level tokenizer: every digit and punctuation mark is one token, known words are one token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|pad|>": 0, "<|mask|>": 1, "<|eos|>": 2, "<|unk|>": 3}
    pieces = list("0123456789") + list("+-*/=?.,:;!()") + [" "]
    for word in ARITH_WORDS:
        pieces += [word, " " + word]
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\d| ?[A-Za-z]+|[^A-Za-z\d ]| "), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", mask_token="<|mask|>", eos_token="<|eos|>", unk_token="<|unk|>"
    )


def build_model(vocab_size: int, *, hidden: int, layers: int, heads: int, seed: int = 0):
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=128,
        type_vocab_size=1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return BertForMaskedLM(config)


def make_batch(problems: list[dict], tokenizer, rng: random.Random, eps: float = 1e-3, max_weight: float = 10.0):
    """Masked-diffusion training batch: (input_ids, attention_mask, labels, weights, n_positions).

    t is drawn stratified over the batch (one draw per 1/batch interval of (0, 1]) and the 1/t loss weight is capped
    at ``max_weight``: with 64 examples per step, uncapped weights of up to 1/eps let a single nearly clean example
    dominate the (clipped) gradient. Capping changes the weighting of noise levels, not the optimal predictions.
    """
    mask_id, eos_id, pad_id = tokenizer.mask_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = []
    offset = rng.random()
    for index, p in enumerate(problems):
        prompt = tokenizer(p["prompt"]).input_ids
        completion = tokenizer(p["completion"]).input_ids + [eos_id]
        gen_len = rng.randint(len(completion), GEN_REGION)  # effective gen_length; past it: hidden tail
        target = prompt + completion + [eos_id] * (GEN_REGION - len(completion))
        g0, g_end = len(prompt), len(prompt) + gen_len
        u = (offset + index / len(problems)) % 1.0
        p_mask = (1 - eps) * (1.0 - u) + eps  # t ~ U(0, 1], stratified
        weight = min(1.0 / p_mask, max_weight)
        if rng.random() < 0.5:  # whole-sequence masking (LLaDA-1 style, also the generic decode loop)
            lo, hi = g0, g_end
        else:  # semi-autoregressive window as LLaDA2Pipeline feeds it (absolute block grid)
            block = rng.choice(BLOCK_CHOICES)
            first, last = g0 // block, (g_end - 1) // block
            k = rng.randint(first, last)
            lo, hi = max(k * block, g0), (k + 1) * block
        ids, attn, labels, weights = [], [], [], []
        for pos in range(hi):
            valid = pos < g_end
            if pos < lo:  # prompt or committed tokens: clean, no loss
                ids.append(target[pos]); labels.append(-100); weights.append(0.0)
            elif not valid:  # block-aligned tail past the generation: hidden from attention, predicts EOS
                ids.append(mask_id); labels.append(eos_id); weights.append(1.0)
            elif rng.random() < p_mask:
                ids.append(mask_id); labels.append(target[pos]); weights.append(weight)
            else:
                ids.append(target[pos]); labels.append(-100); weights.append(0.0)
            attn.append(1 if valid else 0)
        rows.append((ids, attn, labels, weights, hi - lo))
    width = max(len(r[0]) for r in rows)
    pad = lambda seq, v: seq + [v] * (width - len(seq))  # noqa: E731
    input_ids = torch.tensor([pad(r[0], pad_id) for r in rows])
    attention_mask = torch.tensor([pad(r[1], 0) for r in rows])
    labels = torch.tensor([pad(r[2], -100) for r in rows])
    weights = torch.tensor([pad(r[3], 0.0) for r in rows])
    return input_ids, attention_mask, labels, weights, sum(r[4] for r in rows)


def save_atomic_state(path: Path, model, optimizer, meta: dict) -> None:
    from safetensors.torch import save_model

    tmp = path.with_suffix(".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_model(model, str(tmp / "model.safetensors"))  # handles the tied embedding/decoder weights
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "meta.json").write_text(json.dumps(meta))
    if path.exists():
        old = path.with_suffix(".old")
        os.replace(path, old)
        os.replace(tmp, path)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        os.replace(tmp, path)


@torch.no_grad()
def evaluate(pipe, n: int, *, steps: int, gen_length: int, block_length: int, seed: int = 1234) -> float:
    """Held-out accuracy with the stock LLaDA2Pipeline (pure low-confidence top-k commits, greedy)."""
    correct = 0
    for p in arith_problems(n, split="test", seed=seed):
        out = pipe(
            prompt=p["prompt"], gen_length=gen_length, block_length=block_length, num_inference_steps=steps,
            temperature=0.0, threshold=1.0, editing_threshold=None, use_chat_template=False,
        )
        correct += arith_extract_answer(out.texts[0]) == p["answer"]
    return correct / n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="fastgen/assets/arith-dlm")
    ap.add_argument("--work-dir", default="out/arith-dlm-train")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-steps", type=int, default=200_000)
    ap.add_argument("--max-seconds", type=float, default=1800.0, help="wall-clock training budget")
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--eval-problems", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import BlockRefinementScheduler, LLaDA2Pipeline
    from safetensors.torch import load_model

    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), hidden=args.hidden, layers=args.layers, heads=args.heads, seed=args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    work = Path(args.work_dir)
    ckpt = work / "checkpoint"
    step, elapsed, cpu_used = 0, 0.0, 0.0
    if args.resume and ckpt.exists():
        load_model(model, str(ckpt / "model.safetensors"))
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        meta = json.loads((ckpt / "meta.json").read_text())
        step, elapsed, cpu_used = meta["step"], meta["elapsed"], meta["cpu_seconds"]
        print(f"resumed at step {step} ({elapsed:.0f}s)", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params:,}", flush=True)

    rng = random.Random(args.seed * 1000 + step)
    t_wall, t_cpu = time.time() - elapsed, time.process_time() - cpu_used
    ema = None
    model.train()
    while step < args.max_steps and (time.time() - t_wall) < args.max_seconds:
        frac = max(step / args.max_steps, (time.time() - t_wall) / args.max_seconds)
        lr = args.lr * min(1.0, (step + 1) / 300) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        for group in optimizer.param_groups:
            group["lr"] = lr
        problems = []
        while len(problems) < args.batch_size:
            p = arith_problem(rng)
            if not arith_is_heldout(p["kind"], p["a"], p["b"]):
                problems.append(p)
        input_ids, attention_mask, labels, weights, n_pos = make_batch(problems, tokenizer, rng)
        logits = model(input_ids, attention_mask=attention_mask).logits
        ce = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
        loss = (ce * weights).sum() / n_pos
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 50 == 0:
            print(f"step {step} loss {ema:.4f} lr {lr:.2e} {time.time() - t_wall:.0f}s", flush=True)
        if step % args.save_every == 0:
            save_atomic_state(ckpt, model, optimizer, {
                "step": step, "elapsed": time.time() - t_wall, "cpu_seconds": time.process_time() - t_cpu,
            })
    wall, cpu = time.time() - t_wall, time.process_time() - t_cpu
    save_atomic_state(ckpt, model, optimizer, {"step": step, "elapsed": wall, "cpu_seconds": cpu})

    model.eval()
    pipe = LLaDA2Pipeline(model=model, scheduler=BlockRefinementScheduler(block_length=32), tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    acc = evaluate(pipe, args.eval_problems, steps=32, gen_length=24, block_length=32)
    print(f"held-out accuracy ({args.eval_problems} problems, 32 steps): {acc:.3f}", flush=True)

    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    pipe.save_pretrained(str(tmp))
    # diffusers 0.42 neither saves nor reloads LLaDA2Pipeline's optional `tokenizer` (it has a default of None, so the
    # loader passes the raw model_index entry to __init__); save it next to the model and drop the entry.
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    index = json.loads((tmp / "model_index.json").read_text())
    index.pop("tokenizer", None)
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    stats = {
        "parameters": n_params, "steps": step, "batch_size": args.batch_size, "wall_seconds": round(wall, 1),
        "cpu_seconds": round(cpu, 1), "threads": args.threads, "heldout_accuracy_32_steps": acc,
        "eval_problems": args.eval_problems, "hidden": args.hidden, "layers": args.layers, "heads": args.heads,
    }
    (tmp / "training_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    (tmp / "README.md").write_text(model_card(stats, args))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    print(f"saved {out}", flush=True)
    return 0


def model_card(stats: dict, args) -> str:
    return f"""# arith-dlm: a tiny masked diffusion language model (built-in asset of fastgen)

A {stats['parameters']:,}-parameter bidirectional transformer (`transformers.BertForMaskedLM`, hidden
{stats['hidden']}, {stats['layers']} layers, {stats['heads']} heads) trained with the masked-diffusion objective of
LLaDA on a synthetic task with checkable answers. It exists so that Prophet early-commit decoding
(`fastgen.prophet.ProphetScheduler`) can be tested and benchmarked on CPU without downloads.

Load it with `fastgen.load_builtin("arith-dlm")` (an `diffusers.LLaDA2Pipeline`) or
`LLaDA2Pipeline.from_pretrained(<this folder>)`.

## Task
Generated by `fastgen.prophet.arith_problem` (10% of all problems are held out by a fixed hash of the problem and
never trained on):
- addition of two numbers with 1-2 digits: `What is 47+58? ` -> `The answer is 105.`
- comparison of two numbers with 1-3 digits: `Which is larger, 312 or 98? ` -> `The answer is 312.`

The completion is followed by `<|eos|>` padding. Tokens: one per digit and punctuation mark, one per known word.

## Training
- Objective: t ~ U(0, 1] (stratified over the batch), each generated token masked with probability t, cross-entropy
  on masked tokens weighted 1/t, with the weight capped at 10 (batch of 64: uncapped weights let one nearly clean
  example dominate the gradient); the prompt is never masked. Half of the examples are cut at a random block
  boundary (block sizes 4/8/16/32) as `LLaDA2Pipeline` feeds them (clean earlier blocks, noisy current block,
  hidden EOS tail), half mask the whole generation (LLaDA-1 style).
- {stats['steps']} steps of batch {stats['batch_size']}, AdamW lr {args.lr}, cosine decay;
  {stats['wall_seconds']} s wall, {stats['cpu_seconds']} CPU seconds ({stats['threads']} thread(s), shared 2-core CPU).
- Command: `PYTHONPATH=. python scripts/train_arith_dlm.py --out fastgen/assets/arith-dlm
  --max-seconds {int(args.max_seconds)} --batch-size {args.batch_size}` (the learning rate follows a cosine in
  max(step / max_steps, elapsed / max_seconds); a run can be continued with `--resume` and a larger
  `--max-seconds`, which is how this one was extended). The wall time is long for the CPU seconds because the
  2-core machine was shared with other training jobs.

## Accuracy
Held-out accuracy with the stock `LLaDA2Pipeline` + `BlockRefinementScheduler` (gen_length 24, block_length 32,
32 steps per block, greedy, pure low-confidence commits): **{100 * stats['heldout_accuracy_32_steps']:.1f}%** on
{stats['eval_problems']} problems. See `benchmarks/results/prophet.json` for the 500-problem benchmark.

## Limitations
Toy model: it only knows this task and its vocabulary; anything else decodes to nonsense.
"""


if __name__ == "__main__":
    sys.exit(main())
