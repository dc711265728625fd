"""LoRA student and LoRA fake score on the one frozen teacher network (Hu et al. 2021, arXiv:2106.09685).

Instead of two full copies of the teacher (student and fake score), both are low-rank adapters on the
teacher's own network: the base weights exist once in memory and stay frozen, the teacher is the base
with adapters disabled, the student is adapter ``"student"`` and the fake score adapter ``"fake_score"``.
Adapters are added with peft: through diffusers' ``add_adapter`` when the network has it
(``UNet2DConditionModel``, SD3/Flux transformers), with ``peft.inject_adapter_in_model`` (what
``add_adapter`` calls) otherwise (``UNet2DModel``, ``DiTTransformer2DModel``).
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Iterator, Sequence

import torch

DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "proj_out",
                          "ff.net.0.proj", "ff.net.2", "query", "key", "value", "proj_attn")


def _tuner_layers(network: torch.nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in network.modules() if isinstance(m, BaseTunerLayer)]


def default_target_modules(network: torch.nn.Module) -> list[str]:
    """The attention, feed-forward and resnet conv/linear layer names present in ``network``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    kinds = (torch.nn.Linear, torch.nn.Conv2d, BaseTunerLayer)  # layers already adapted count too
    names = {n for n, m in network.named_modules() if isinstance(m, kinds)}
    found = [t for t in DEFAULT_TARGET_MODULES if any(n == t or n.endswith("." + t) for n in names)]
    if not found:
        raise ValueError(f"no LoRA target module found in {type(network).__name__}; pass lora_target_modules.")
    return found


def add_lora(network: torch.nn.Module, adapter_name: str, rank: int = 16, alpha: float | None = None,
             target_modules: Sequence[str] | None = None, init_lora_weights: bool | str = True) -> list[torch.nn.Parameter]:
    """Add adapter ``adapter_name`` to ``network`` (base frozen) and return its trainable parameters.

    With ``init_lora_weights=True`` the up-projection starts at zero, so the adapted network equals the
    base network at initialisation (student and fake score both start as the teacher).
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"lora rank must be a positive integer, got {rank!r}.")
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                        target_modules=list(target_modules or default_target_modules(network)),
                        init_lora_weights=init_lora_weights)
    flags = {n: p.requires_grad for n, p in network.named_parameters() if "lora_" in n}
    for n, p in network.named_parameters():
        if "lora_" not in n:
            p.requires_grad_(False)
    with warnings.catch_warnings():  # a second adapter on one network is the point here
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        if hasattr(network, "add_adapter"):
            network.add_adapter(config, adapter_name=adapter_name)
        else:
            inject_adapter_in_model(config, network, adapter_name=adapter_name)
    params = adapter_parameters(network, adapter_name)
    for n, p in network.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])
    for p in params:
        p.requires_grad_(True)
    return params


def adapter_parameters(network: torch.nn.Module, adapter_name: str) -> list[torch.nn.Parameter]:
    """The parameters of adapter ``adapter_name`` (names containing ``.<adapter_name>.``)."""
    key = f".{adapter_name}."
    params = [p for n, p in network.named_parameters() if "lora_" in n and key in n]
    if not params:
        raise ValueError(f"network has no LoRA adapter named {adapter_name!r}.")
    return params


@contextlib.contextmanager
def _keep_requires_grad(network: torch.nn.Module) -> Iterator[None]:
    flags = [(p, p.requires_grad) for n, p in network.named_parameters() if "lora_" in n]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def use_adapter(network: torch.nn.Module, adapter_name: str | None) -> Iterator[None]:
    """Run ``network`` with only adapter ``adapter_name`` active (``None``: the base, adapters disabled).

    peft's switches also flip ``requires_grad`` of adapter weights; those flags are restored on exit, so
    the optimiser's view of what is trainable never changes.
    """
    layers = _tuner_layers(network)
    if not layers:
        if adapter_name is not None:
            raise ValueError(f"network has no LoRA adapter named {adapter_name!r}.")
        yield
        return
    saved = [(layer, list(layer.active_adapters), layer.disable_adapters) for layer in layers]
    with _keep_requires_grad(network):
        try:
            for layer in layers:
                if adapter_name is None:
                    layer.enable_adapters(False)
                else:
                    layer.set_adapter(adapter_name)
                    layer.enable_adapters(True)
            yield
        finally:
            for layer, active, disabled in saved:
                layer.set_adapter(active)
                layer.enable_adapters(not disabled)


def merged_copy(network: torch.nn.Module, adapter_name: str) -> torch.nn.Module:
    """A plain copy of ``network`` with adapter ``adapter_name`` merged into the base weights.

    What a LoRA student exports: the same architecture as the teacher, loadable by any pipeline.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    net = copy.deepcopy(network)
    for name, module in list(net.named_modules()):
        if isinstance(module, BaseTunerLayer):
            if adapter_name in module.lora_A:
                module.merge(adapter_names=[adapter_name])
            parent_name, _, child = name.rpartition(".")
            parent = net.get_submodule(parent_name) if parent_name else net
            setattr(parent, child, module.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in net.__dict__:
            delattr(net, attr)
    net.requires_grad_(False)
    return net
