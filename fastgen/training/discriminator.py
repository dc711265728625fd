"""GAN discriminator of DMD2: small heads on intermediate features of a diffusion network.

DMD2 (Yin et al. 2024, arXiv:2405.14867, section 4.3) classifies noised real versus noised student
samples from the fake score's bottleneck features; NVlabs/FastGen reads the frozen teacher's features
instead (our default, spec correction 0.4). Features are read with forward hooks on named blocks of the
network (``"mid_block"``, ``"down_blocks.1"``, ``"transformer_blocks.3"``), so the diffusers forward is
never forked. Each block gets a head; the logit is the mean over heads.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn


def default_feature_blocks(network: nn.Module) -> list[str]:
    """The bottleneck: ``mid_block`` for UNets, the middle transformer block for transformers."""
    names = dict(network.named_children())
    if names.get("mid_block") is not None:
        return ["mid_block"]
    blocks = getattr(network, "transformer_blocks", None)
    if blocks is not None and len(blocks):
        return [f"transformer_blocks.{len(blocks) // 2}"]
    raise ValueError(f"no default discriminator feature block for {type(network).__name__}; pass feature_blocks.")


def feature_channels(network: nn.Module, block: str) -> int:
    """Channels (UNets) or token width (transformers) of a block's output, from the network config."""
    cfg = network.config
    if block == "mid_block" or block.startswith(("down_blocks.", "up_blocks.")):
        chans = list(cfg["block_out_channels"])
        if block == "mid_block":
            return int(chans[-1])
        index = int(block.split(".")[1])
        return int(chans[index] if block.startswith("down") else chans[::-1][index])
    if block.startswith(("transformer_blocks.", "single_transformer_blocks.")):
        return int(cfg["num_attention_heads"] * cfg["attention_head_dim"])
    raise ValueError(f"feature block {block!r} is not supported; use mid_block, down_blocks.<i>, up_blocks.<i> "
                     f"or transformer_blocks.<i>.")


class StopForward(Exception):
    """Raised by a :class:`FeatureTap` hook once every tapped block has run (the rest of the forward is skipped)."""


class FeatureTap:
    """Forward hooks that record the outputs of named blocks, only inside :meth:`capture`.

    :meth:`run` calls the network and stops it as soon as every tapped block has produced its output, so a
    bottleneck head costs about half a forward.
    """

    def __init__(self, network: nn.Module, blocks: Sequence[str]):
        self.blocks = list(blocks)
        self._store: dict[str, torch.Tensor] | None = None
        self._stop = False
        self._handles = []
        for name in self.blocks:
            try:
                module = network.get_submodule(name)
            except AttributeError as err:
                raise ValueError(f"feature block {name!r} not found in {type(network).__name__}.") from err
            self._handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module, args, output):
            if self._store is not None:
                self._store[name] = output[0] if isinstance(output, (tuple, list)) else output
                if self._stop and len(self._store) == len(self.blocks):
                    raise StopForward
        return hook

    @contextlib.contextmanager
    def capture(self) -> Iterator[dict[str, torch.Tensor]]:
        """``with tap.capture() as feats: network(...)``: ``feats`` maps block name to its output."""
        self._store = {}
        try:
            yield self._store
        finally:
            self._store = None

    def run(self, fn, *args, **kwargs) -> dict[str, torch.Tensor]:
        """``fn(*args, **kwargs)`` (a network call) stopped after the last tapped block; the features."""
        with self.capture() as features:
            self._stop = True
            try:
                fn(*args, **kwargs)
            except StopForward:
                pass
            finally:
                self._stop = False
        missing = [b for b in self.blocks if b not in features]
        if missing:
            raise RuntimeError(f"feature blocks {missing} did not run in the network's forward.")
        return features

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _groups(channels: int) -> int:
    for g in (32, 16, 8, 4, 2):
        if channels % g == 0:
            return g
    return 1


class DiscriminatorHead(nn.Module):
    """One logit per sample from block features, mean over heads.

    UNet feature maps ``[B, C, H, W]``: 3x3 conv, GroupNorm, SiLU, 1x1 conv to one channel, spatial mean.
    Transformer tokens ``[B, N, D]``: LayerNorm, Linear, SiLU, Linear to one, token mean.
    """

    def __init__(self, channels: dict[str, int]):
        super().__init__()
        self.blocks = list(channels)
        self.heads = nn.ModuleDict()
        for name, c in channels.items():
            if _is_token_block(name):
                head = nn.Sequential(nn.LayerNorm(c), nn.Linear(c, c), nn.SiLU(), nn.Linear(c, 1))
            else:
                head = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(_groups(c), c), nn.SiLU(),
                                     nn.Conv2d(c, 1, 1))
            self.heads[name.replace(".", "_")] = head

    @classmethod
    def for_network(cls, network: nn.Module, blocks: Sequence[str] | None = None) -> "DiscriminatorHead":
        """Heads sized for ``network``'s blocks (default: the bottleneck)."""
        blocks = list(blocks) if blocks else default_feature_blocks(network)
        return cls({b: feature_channels(network, b) for b in blocks})

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = []
        for name in self.blocks:
            head = self.heads[name.replace(".", "_")]
            f = features[name]
            expected = 3 if _is_token_block(name) else 4
            if f.ndim != expected:
                raise ValueError(f"features of block {name!r} must have {expected} dims, got {tuple(f.shape)}.")
            dtype = next(head.parameters()).dtype
            logits.append(head(f.to(dtype)).flatten(1).mean(1))
        return torch.stack(logits).mean(0).float()


def _is_token_block(name: str) -> bool:
    return "transformer_blocks" in name
