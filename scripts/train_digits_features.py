#!/usr/bin/env python
"""Train the built-in digits feature network (``fastgen/assets/digits-features``).

``DigitsFeatureNet`` is trained as a 10-way classifier on the 500-image ``"features"`` split of
``fastgen.datasets`` only, with augmentation (random shifts, small rotations and scales through
``affine_grid``, mild Gaussian noise) so that it generalises to the ``"train"`` and ``"heldout"``
splits and to generated samples. Its 64-d penultimate layer is the digits FID feature space.

Example::

    python scripts/train_digits_features.py --steps 1500 --out fastgen/assets/digits-features
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastgen.datasets import load_digits_images  # noqa: E402
from fastgen.metrics.digits import DigitsFeatureNet  # noqa: E402


def augment(x: torch.Tensor, gen: torch.Generator, max_shift_px: float = 2.0, max_rot_deg: float = 12.0,
            scale_range: float = 0.1, noise_std: float = 0.05) -> torch.Tensor:
    """Random affine (shift up to ``max_shift_px`` pixels, rotation, isotropic scale) plus Gaussian noise."""
    n, _, h, _ = x.shape
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(max_rot_deg)
    scale = 1 + (torch.rand(n, generator=gen) * 2 - 1) * scale_range
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * (2 * max_shift_px / h)  # grid units: 2/h per pixel
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Background is -1: sample x + 1 with zero padding, then shift back.
    out = F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
    out = out + noise_std * torch.rand(n, 1, 1, 1, generator=gen) * torch.randn(out.shape, generator=gen)
    return out.clamp(-1, 1)


@torch.no_grad()
def accuracy(net: DigitsFeatureNet, split: str) -> float:
    """Classification accuracy of ``net`` on a dataset split."""
    x, y = load_digits_images(split)
    return (net.classify(x) == y).float().mean().item()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("fastgen/assets/digits-features"), help="output folder")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (cosine decay)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        p.error("--steps and --batch-size must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x, y = load_digits_images("features")
    net = DigitsFeatureNet()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    t0 = time.process_time()
    net.train()
    for _ in tqdm(range(args.steps), desc="train digits features", dynamic_ncols=True):
        idx = torch.randint(0, x.shape[0], (args.batch_size,), generator=gen)
        loss = F.cross_entropy(net(augment(x[idx], gen)), y[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    cpu_seconds = time.process_time() - t0
    net.eval()
    acc = {split: round(accuracy(net, split), 4) for split in ("features", "train", "heldout")}
    n_params = sum(p.numel() for p in net.parameters())
    net.save_pretrained(args.out)
    command = "python scripts/train_digits_features.py " + " ".join(argv if argv is not None else sys.argv[1:])
    info = {"accuracy": acc, "cpu_seconds": round(cpu_seconds, 1), "parameters": n_params, "command": command.strip()}
    (args.out / "README.md").write_text(model_card(info, args))
    print(json.dumps(info, indent=2))


def model_card(info: dict, args: argparse.Namespace) -> str:
    acc = info["accuracy"]
    return f"""# digits-features: FID feature network for the built-in digits domain

`fastgen.metrics.DigitsFeatureNet`, a small CNN classifier for 16x16 grey-scale digits in [-1, 1]
({info['parameters']:,} parameters: conv 32 -> conv 64 -> max-pool -> conv 64 -> max-pool -> fc 64 -> 10 logits).
Its 64-d penultimate ReLU activations (`features(x)`) are the FID feature space of the digits domain,
like LeNet features for MNIST FID. Inputs must be in [-1, 1]; other sizes are resized to 16x16 and
3-channel inputs are averaged to one channel.

Load with `fastgen.load_builtin("digits-features")` or `DigitsFeatureNet.from_pretrained(folder)`
(safetensors weights + `config.json`, no pickle).

## Data

scikit-learn's bundled handwritten digits (`sklearn.datasets.load_digits`, 1,797 8x8 images from
the UCI ML hand-written digits dataset), scaled to [-1, 1] and upsampled to 16x16 with bilinear
interpolation (`fastgen.datasets.load_digits_images`). Trained **only** on the 500-image
`"features"` split, so it never saw the `"train"` split (diffusion training data and FID
reference statistics) nor the `"heldout"` split (FID noise floor).

Augmentation: random shifts up to +-2 px, rotations up to +-12 degrees, scales 0.9-1.1
(`affine_grid`), Gaussian noise with std up to 0.05; label smoothing 0.05; AdamW with a one-cycle
learning-rate schedule (peak {args.lr}), batch {args.batch_size}, {args.steps} steps, seed {args.seed}.

## Training

```
{info['command']}
```

CPU time: {info['cpu_seconds']:.0f} s (1 thread).

## Accuracy

| split | images | accuracy |
|---|---|---|
| features (training data) | 500 | {acc['features']:.4f} |
| train | 1,000 | {acc['train']:.4f} |
| heldout | 297 | {acc['heldout']:.4f} |

## License

The digits data ships with scikit-learn (BSD-3-Clause) and comes from the UCI ML hand-written
digits dataset (Alpaydin & Kaynak, 1998; CC BY 4.0). The weights are released with fastgen.
"""


if __name__ == "__main__":
    main()
