#!/usr/bin/env python
"""Train the built-in class-conditional digits diffusion model (``fastgen/assets/digits``).

A small ``diffusers.UNet2DModel`` learns to predict the noise (epsilon) of a linear-beta DDPM
(Ho et al., 2020, "Denoising Diffusion Probabilistic Models", arXiv:2006.11239) on the 1,000-image
``"train"`` split of scikit-learn's digits, upsampled to 16x16 (``fastgen.datasets``). Class 10 is
the null label: labels are dropped to 10 with probability ``--label-dropout`` so the same network
is also unconditional, which classifier-free guidance needs (Ho & Salimans, 2022, "Classifier-Free
Diffusion Guidance", arXiv:2207.12598). No flips or other augmentation: digits are not symmetric.

The saved weights are the exponential moving average (EMA) of the training weights. Output:
``<out>/unet`` (``UNet2DModel.save_pretrained``, safetensors) and ``<out>/scheduler`` (a
``DPMSolverMultistepScheduler`` built from the training DDPM config with data-prediction clipping
to [-1, 1] (``thresholding=True, sample_max_value=1.0``), the default sampler).
``model_index.json`` is written by ``FastGenClassPipeline``, not here.

Checkpoints (model, EMA, optimizer, RNG, step, CPU seconds) are written atomically every
``--ckpt-every`` steps to ``--ckpt-dir``; ``--resume`` continues from the last one.

Example::

    python scripts/train_digits.py --steps 3000 --batch-size 64 --out fastgen/assets/digits

The second, deliberately weaker workload ``builtin:digits-small`` (a smaller network trained for fewer steps,
so that guidance improves its FID) is built with these options (the exact command is in ``fastgen/assets/digits-small/README.md``):

    python scripts/train_digits.py --block-out-channels 16 32 32 --attention-head-dim 16 --steps 800 \\
        --pipeline --ckpt-dir out/digits_small_ckpt --out fastgen/assets/digits-small
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel  # noqa: E402

from fastgen.datasets import load_digits_images  # noqa: E402

NUM_CLASSES = 10
NULL_LABEL = 10


def build_unet(block_out_channels=(32, 64, 96), attention_head_dim: int = 32) -> UNet2DModel:
    """The built-in digits UNet: 16x16x1, three levels (default 32, 64, 96), attention at 8x8 and 4x4 (~1.74M
    params at the defaults; ``builtin:digits-small`` uses (16, 32, 32) with head dim 16, ~0.28M)."""
    return UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        num_class_embeds=NUM_CLASSES + 1,
        layers_per_block=1,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=attention_head_dim,
        norm_num_groups=8,
    )


def build_ddpm(beta_schedule: str) -> DDPMScheduler:
    """Training noise schedule: 1,000 steps, epsilon prediction."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, prediction_type="epsilon")


def lr_at(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of ``base_lr``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` for every parameter and buffer."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("fastgen/assets/digits"), help="output folder (unet/, scheduler/)")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=int, default=200, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--label-dropout", type=float, default=0.12, help="probability of replacing the label by 10")
    p.add_argument("--beta-schedule", choices=["linear", "squaredcos_cap_v2"], default="linear")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-out-channels", type=int, nargs=3, default=[32, 64, 96], metavar="C",
                   help="UNet channels of the three levels (multiples of 8)")
    p.add_argument("--attention-head-dim", type=int, default=32, help="attention head dim (divides the 2nd/3rd level)")
    p.add_argument("--pipeline", action="store_true",
                   help="also write model_index.json and the diffusers entry file (a complete FastGenClassPipeline folder)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--ckpt-dir", type=Path, default=Path("out/digits_ckpt"))
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--resume", action="store_true", help="continue from <ckpt-dir>/last.pt if it exists")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        p.error("--steps and --batch-size must be positive")
    if not 0.0 <= args.label_dropout < 1.0:
        p.error("--label-dropout must be in [0, 1)")
    if any(c < 8 or c % 8 for c in args.block_out_channels):
        p.error("--block-out-channels must be positive multiples of 8 (GroupNorm with 8 groups)")
    if args.attention_head_dim < 1 or any(c % args.attention_head_dim for c in args.block_out_channels[1:]):
        p.error("--attention-head-dim must divide the channels of the 2nd and 3rd levels")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    images, labels = load_digits_images("train", size=16)
    n = images.shape[0]

    unet = build_unet(args.block_out_channels, args.attention_head_dim)
    ema = copy.deepcopy(unet).requires_grad_(False)
    ddpm = build_ddpm(args.beta_schedule)
    alphas_cumprod = ddpm.alphas_cumprod.float()
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)
    step, cpu_seconds, losses = 0, 0.0, []

    ckpt_path = args.ckpt_dir / "last.pt"
    if args.resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        step, cpu_seconds, losses = state["step"], state["cpu_seconds"], state["losses"]
        print(f"resumed from {ckpt_path} at step {step}")

    n_params = sum(p.numel() for p in unet.parameters())
    print(f"UNet2DModel: {n_params:,} parameters; train images: {n}; schedule: {args.beta_schedule}")
    unet.train()
    bar = tqdm(total=args.steps, initial=step, desc="train digits", dynamic_ncols=True)
    t_cpu = time.process_time()
    running = None
    while step < args.steps:
        idx = torch.randint(0, n, (args.batch_size,), generator=gen)
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(args.batch_size, generator=gen) < args.label_dropout] = NULL_LABEL
        t = torch.randint(0, ddpm.config.num_train_timesteps, (args.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise

        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.lr, args.warmup, args.steps)
        loss = F.mse_loss(unet(xt, t, class_labels=y).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        step += 1
        ema_update(ema, unet, min(args.ema_decay, (1 + step) / (10 + step)))

        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}")
        if step % args.ckpt_every == 0 or step == args.steps:
            cpu_seconds += time.process_time() - t_cpu
            t_cpu = time.process_time()
            save_checkpoint(
                ckpt_path,
                {"unet": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                 "step": step, "cpu_seconds": cpu_seconds, "losses": losses, "args": {k: str(v) for k, v in vars(args).items()}},
            )
    bar.close()

    args.out.mkdir(parents=True, exist_ok=True)
    ema.save_pretrained(args.out / "unet", safe_serialization=True)
    # Pixel-space epsilon model: clip the data prediction to [-1, 1] at every step (the DPM-Solver++
    # analogue of DDPM's clip_sample=True). Without it the first steps amplify epsilon errors by
    # 1/sqrt(alpha_bar_T) ~ 157 for the linear schedule and some samples end as saturated noise.
    dpm = DPMSolverMultistepScheduler.from_config(ddpm.config, thresholding=True, sample_max_value=1.0)
    dpm.save_pretrained(args.out / "scheduler")
    if args.pipeline:  # model_index.json + entry file, as FastGenClassPipeline.save_pretrained writes them
        from fastgen.pipelines.class_conditional import FastGenClassPipeline

        FastGenClassPipeline(scheduler=dpm, unet=ema, id2label={i: str(i) for i in range(NUM_CLASSES)}).save_pretrained(args.out)
    info = {"steps": step, "cpu_seconds": round(cpu_seconds, 1), "parameters": n_params,
            "final_loss_avg_last_200": sum(losses[-200:]) / len(losses[-200:]), "args": {k: str(v) for k, v in vars(args).items()}}
    (args.ckpt_dir / "train_info.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
