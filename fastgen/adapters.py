"""Guidance adapters: one network evaluation that reproduces classifier-free guidance at any scale.

Adapter guidance distillation (AGD; Jensen & Sadat, *Efficient Distillation of Classifier-Free Guidance
using Adapters*, arXiv:2503.07274, TMLR 2025) keeps the base network frozen and adds small residual
adapters on its attention blocks, conditioned on the guidance scale ``omega``:

    block(x) -> block(x) + adapter(x, omega, t, c)        # trained so that one pass ~ CFG at omega

A :class:`GuidanceAdapter` is a diffusers ``ModelMixin`` (``save_pretrained`` writes ``config.json`` and
``diffusion_pytorch_model.safetensors``; ``GuidanceAdapter.from_pretrained(folder)`` reloads it). It is
attached to a base network with forward hooks (:meth:`GuidanceAdapter.attach`) -- the diffusers forward is
never forked -- on:

* ``UNet2DConditionModel`` (SD 1.x/2.x, SDXL): every cross-attention ``attn2`` of the down, mid and up
  blocks, including the extra attention of each up block (up blocks have ``layers_per_block + 1``
  attentions; the reference code adapts only ``layers_per_block`` of them, spec §0.12);
* ``DiTTransformer2DModel`` / ``Transformer2DModel`` with ``ada_norm_zero`` (DiT): every block's ``attn1``;
* class-conditional ``UNet2DModel`` (the built-in digits model): every self-attention block.

Conditioning. ``omega`` goes through fixed random Fourier features (cos; frequencies and phases are
buffers saved with the adapter, spec §0.12), a 2-layer MLP and a LayerNorm. The timestep and the class
enter through the base's *own* embedding: hooks read the outputs of the base's ``time_embedding`` (plus
``class_embedding`` / ``add_embedding`` when present; for DiT the first block's timestep+label embedding)
during its forward, so the adapter always sees exactly the embedding the base computed. Text conditions
(prompt tokens) are the ``encoder_hidden_states`` each cross-attention receives. ``omega`` itself cannot
travel through the diffusers forward, so it is set on the adapter before the call
(:meth:`GuidanceAdapter.set_guidance_scale`, or the :meth:`GuidanceAdapter.guidance_scale` context).

Variants (``variant=``):

* ``"attention"`` (the paper's cross-attention adapter; default for text UNets): the block's tokens attend
  to ``[omega token, time/class token, projected prompt tokens]``;
* ``"additive"`` (the offset adapter; default for DiT and class-conditional UNets): an MLP over the summed
  ``omega`` and base embeddings gives a token-independent offset per block.

Zero initialisation (default, ``zero_init=True``): every output projection starts at zero, so a fresh
adapter leaves the base output unchanged bit for bit (``output + 0``). (The reference code inverts this
flag for its attention adapter and leaves SD adapters non-zero by default, spec §0.12.)
"""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from .guidance.base import LoopHooks

VARIANTS = ("attention", "additive")
FAMILIES = ("unet_text", "unet_class", "dit")
CONFIG_NAME = "config.json"


# ---------------------------------------------------------------------- what to adapt on a base network
def _family(model: torch.nn.Module) -> str:
    name = type(model).__name__
    if name == "UNet2DConditionModel":
        return "unet_text"
    if name == "UNet2DModel":
        return "unet_class"
    if name in ("DiTTransformer2DModel", "Transformer2DModel"):
        blocks = getattr(model, "transformer_blocks", None)
        if blocks and getattr(getattr(blocks[0], "norm1", None), "emb", None) is not None:
            return "dit"
    raise TypeError(f"model must be a UNet2DConditionModel, a class-conditional UNet2DModel or a DiT "
                    f"(DiTTransformer2DModel / Transformer2DModel with ada_norm_zero), got {name}.")


def adapter_targets(model: torch.nn.Module) -> dict[str, int]:
    """``{module path: channels}`` of the attention blocks an adapter attaches to (see the module docstring)."""
    from diffusers.models.attention_processor import Attention

    family = _family(model)
    out: dict[str, int] = {}
    for name, module in model.named_modules():
        if not isinstance(module, Attention):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if (family == "unet_text" and leaf == "attn2") or (family == "dit" and leaf == "attn1") or \
                family == "unet_class":
            out[name] = int(module.to_q.in_features)
    if not out:
        raise ValueError(f"{type(model).__name__} has no attention blocks to adapt (add_attention=False?).")
    return out


def embedding_sources(model: torch.nn.Module) -> list[str]:
    """The base's own embedding modules whose outputs (summed) condition the adapter: time, then class/added."""
    family = _family(model)
    if family == "dit":
        return ["transformer_blocks.0.norm1.emb"]
    names = ["time_embedding"]
    for extra in ("class_embedding", "add_embedding"):
        if getattr(model, extra, None) is not None:
            names.append(extra)
    return names


def embedding_dim(model: torch.nn.Module) -> int:
    family = _family(model)
    if family == "dit":
        return int(model.transformer_blocks[0].norm1.linear.in_features)
    return int(model.time_embedding.linear_2.out_features)


def default_variant(model: torch.nn.Module) -> str:
    """``"attention"`` for text-conditional UNets (SD, SDXL), ``"additive"`` for DiT and class UNets."""
    return "attention" if _family(model) == "unet_text" else "additive"


def _key(path: str) -> str:
    return path.replace(".", "__")


# ---------------------------------------------------------------------- building blocks
class OmegaEmbedding(torch.nn.Module):
    """``omega -> LayerNorm(MLP(cos(2 pi f omega + phase)))`` with fixed random ``f ~ N(0, std^2)``, ``phase ~ U[0, 2pi)``."""

    def __init__(self, fourier_dim: int, hidden: int, out_dim: int, std: float, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(int(seed))
        self.register_buffer("frequencies", torch.randn(fourier_dim, generator=gen) * float(std))
        self.register_buffer("phases", torch.rand(fourier_dim, generator=gen) * (2 * math.pi))
        self.mlp = torch.nn.Sequential(torch.nn.Linear(fourier_dim, hidden), torch.nn.SiLU(),
                                       torch.nn.Linear(hidden, out_dim))
        self.norm = torch.nn.LayerNorm(out_dim)

    def forward(self, omega: torch.Tensor) -> torch.Tensor:
        phase = 2 * math.pi * omega.float()[:, None] * self.frequencies.float()[None] + self.phases.float()[None]
        features = math.sqrt(2.0) * torch.cos(phase)
        return self.norm(self.mlp(features.to(self.mlp[0].weight.dtype)))


class AdditiveAdapter(torch.nn.Module):
    """Offset adapter: ``MLP(e)`` with ``e`` the summed omega and base embeddings, one offset per block."""

    def __init__(self, emb_dim: int, width: int, channels: int):
        super().__init__()
        self.hidden = torch.nn.Linear(emb_dim, width)
        self.out = torch.nn.Linear(width, channels)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.out(F.silu(self.hidden(e)))


class CrossAttentionAdapter(torch.nn.Module):
    """The paper's cross-attention adapter: block tokens (layer-normed) attend to the condition tokens."""

    def __init__(self, channels: int, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = torch.nn.Linear(channels, width, bias=False)
        self.to_k = torch.nn.Linear(width, width, bias=False)
        self.to_v = torch.nn.Linear(width, width, bias=False)
        self.out = torch.nn.Linear(width, channels)

    def forward(self, tokens: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, _ = tokens.shape
        h = self.heads
        q = self.to_q(F.layer_norm(tokens, tokens.shape[-1:]))
        k, v = self.to_k(context), self.to_v(context)
        q, k, v = (z.reshape(b, z.shape[1], h, -1).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return self.out(y)


# ---------------------------------------------------------------------- the adapter
class GuidanceAdapter(ModelMixin, ConfigMixin):
    """Guidance-scale-conditioned residual adapters on a frozen base network (AGD, arXiv:2503.07274).

    Build one for a network with :meth:`for_model`, attach it with :meth:`attach`, set ``omega`` with
    :meth:`set_guidance_scale` (a number, or one value per row) and call the base as usual.

    Args:
        family: ``"unet_text"``, ``"unet_class"`` or ``"dit"`` (the base's kind).
        layers: ``{module path: channels}`` of the adapted attention blocks.
        emb_sources: the base's embedding modules whose outputs (summed) condition the adapter.
        emb_dim: width of those embeddings.
        context_dim: width of the prompt tokens (text UNets), else ``None``.
        variant: ``"attention"`` or ``"additive"``.
        width: hidden width of each adapter.
        heads: attention heads of the ``"attention"`` variant.
        fourier_dim, fourier_std: number and spread of the random Fourier frequencies of omega.
        zero_init: start every output projection at zero (the adapted base equals the base exactly).
        seed: seed of the Fourier buffers and of the non-zero initialisations.
    """

    config_name = CONFIG_NAME

    @register_to_config
    def __init__(self, family: str, layers: dict[str, int], emb_sources: list[str], emb_dim: int,
                 context_dim: int | None = None, variant: str = "additive", width: int = 64, heads: int = 1,
                 fourier_dim: int = 32, fourier_std: float = 1.0, zero_init: bool = True, seed: int = 0):
        super().__init__()
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {family!r}.")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
        for name, value in (("width", width), ("heads", heads), ("fourier_dim", fourier_dim), ("emb_dim", emb_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if variant == "attention" and width % heads:
            raise ValueError(f"width ({width}) must divide by heads ({heads}).")
        if not layers:
            raise ValueError("layers must name at least one attention block.")
        with torch.random.fork_rng(devices=[]):  # initialisations reproducible from the config; global RNG untouched
            torch.manual_seed(int(seed))
            self._build(layers, emb_dim, context_dim, variant, width, heads, fourier_dim, fourier_std, zero_init, seed)
        self.enabled = True
        self._omega: torch.Tensor | float = 1.0
        self._handles: list = []
        self._captured: dict[str, torch.Tensor] = {}
        self._cache: dict[str, torch.Tensor] = {}
        self.__dict__["_base"] = None

    def _build(self, layers, emb_dim, context_dim, variant, width, heads, fourier_dim, fourier_std, zero_init, seed):
        token_dim = width if variant == "attention" else emb_dim
        self.omega_embedding = OmegaEmbedding(fourier_dim, width, token_dim, fourier_std, seed)
        if variant == "attention":
            self.emb_proj = torch.nn.Linear(emb_dim, width)
            self.context_proj = torch.nn.Linear(context_dim, width) if context_dim else None
            self.blocks = torch.nn.ModuleDict({_key(n): CrossAttentionAdapter(c, width, heads) for n, c in layers.items()})
        else:
            self.emb_proj = None
            self.context_proj = torch.nn.Linear(context_dim, emb_dim) if context_dim else None
            self.blocks = torch.nn.ModuleDict({_key(n): AdditiveAdapter(emb_dim, width, c) for n, c in layers.items()})
        for block in self.blocks.values():
            if zero_init:
                torch.nn.init.zeros_(block.out.weight)
                torch.nn.init.zeros_(block.out.bias)
            else:
                torch.nn.init.xavier_uniform_(block.out.weight)

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_model(cls, model: torch.nn.Module, variant: str | None = None, width: int | None = None,
                  heads: int | None = None, fourier_dim: int = 32, fourier_std: float = 1.0, zero_init: bool = True,
                  seed: int = 0) -> "GuidanceAdapter":
        """An adapter fitted to ``model``'s attention blocks.

        Defaults: ``variant`` from :func:`default_variant`; ``width = min(320, max(8, C_max // 4))`` for
        ``"attention"`` (320 on SD2.1/SDXL, the paper's width) and ``min(256, max(8, C_max // 4))`` for
        ``"additive"`` (the paper's 256 on DiT-XL), with ``C_max`` the widest adapted block; ``heads =
        max(1, width // 64)``. This keeps the trainable share near the paper's ~2% from tiny test networks to SD.
        """
        variant = variant or default_variant(model)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
        layers = adapter_targets(model)
        cap = 320 if variant == "attention" else 256
        width = width if width is not None else min(cap, max(8, max(layers.values()) // 4))
        heads = heads if heads is not None else max(1, width // 64)
        context_dim = None
        if _family(model) == "unet_text":
            cross = model.config.cross_attention_dim
            context_dim = int(cross[0] if isinstance(cross, (list, tuple)) else cross)
        return cls(family=_family(model), layers=layers, emb_sources=embedding_sources(model),
                   emb_dim=embedding_dim(model), context_dim=context_dim, variant=variant, width=int(width),
                   heads=int(heads), fourier_dim=fourier_dim, fourier_std=fourier_std, zero_init=zero_init, seed=seed)

    # ------------------------------------------------------------------ attaching
    @property
    def base(self) -> torch.nn.Module | None:
        """The network the adapter is attached to (not a submodule: it is neither saved nor optimised)."""
        return self.__dict__["_base"]

    def check_fits(self, model: torch.nn.Module) -> None:
        """Raise ``ValueError`` unless ``model`` has exactly the blocks (and widths) this adapter was built for."""
        cfg = self.config
        try:
            family, layers = _family(model), adapter_targets(model)
        except TypeError as err:
            raise ValueError(f"this guidance adapter does not fit: {err}") from None
        if family != cfg.family or layers != dict(cfg.layers) or embedding_dim(model) != cfg.emb_dim:
            raise ValueError(f"this guidance adapter was built for a {cfg.family} base with blocks "
                             f"{dict(cfg.layers)} and embedding width {cfg.emb_dim}; {type(model).__name__} has "
                             f"{layers} and {embedding_dim(model)}. Load an adapter trained on this base.")

    def attach(self, model: torch.nn.Module) -> "GuidanceAdapter":
        """Register the forward hooks on ``model`` (detaching from a previous base first); returns ``self``."""
        self.check_fits(model)
        self.detach()
        modules = dict(model.named_modules())
        for i, source in enumerate(self.config.emb_sources):
            self._handles.append(modules[source].register_forward_hook(self._capture_hook(source, first=i == 0)))
        for name in self.config.layers:
            self._handles.append(modules[name].register_forward_hook(self._block_hook(name), with_kwargs=True))
        self.__dict__["_base"] = model
        return self

    def detach(self) -> None:
        """Remove the hooks: the base runs exactly as before."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._captured.clear()
        self._cache.clear()
        self.__dict__["_base"] = None

    def match(self, model: torch.nn.Module) -> "GuidanceAdapter":
        """Move to ``model``'s device and dtype (no-op when already there)."""
        if self.device != model.device:
            torch.nn.Module.to(self, device=model.device)
        if self.dtype != model.dtype:
            torch.nn.Module.to(self, dtype=model.dtype)
        return self

    # ------------------------------------------------------------------ omega
    def set_guidance_scale(self, omega: float | torch.Tensor) -> None:
        """The guidance scale of the next base calls: a number, or a tensor with one value per row."""
        if isinstance(omega, torch.Tensor):
            omega = omega.detach().reshape(-1)
            if not bool(torch.isfinite(omega).all()):
                raise ValueError("guidance_scale must be finite.")
        elif isinstance(omega, bool) or not isinstance(omega, (int, float)) or not math.isfinite(omega):
            raise ValueError(f"guidance_scale must be a finite number or a tensor, got {omega!r}.")
        self._omega = omega

    @contextlib.contextmanager
    def guidance_scale(self, omega: float | torch.Tensor) -> Iterator["GuidanceAdapter"]:
        """Context manager: base calls inside run at guidance scale ``omega``."""
        old = self._omega
        self.set_guidance_scale(omega)
        try:
            yield self
        finally:
            self._omega = old

    def _omega_rows(self, batch: int, device) -> torch.Tensor:
        omega = self._omega
        if not isinstance(omega, torch.Tensor):
            return torch.full((batch,), float(omega), device=device)
        omega = omega.to(device=device, dtype=torch.float32)
        if omega.numel() == 1:
            return omega.expand(batch)
        if batch % omega.numel():
            raise ValueError(f"guidance_scale has {omega.numel()} values for a batch of {batch} rows.")
        return omega.repeat(batch // omega.numel())  # a batched CFG call [uncond; cond] repeats the rows

    # ------------------------------------------------------------------ hooks
    def _capture_hook(self, source: str, first: bool):
        def hook(module, args, output):
            if first:  # the first embedding of a forward: a new base call starts
                self._captured.clear()
                self._cache.clear()
            self._captured[source] = output
        return hook

    def _embedding(self) -> torch.Tensor:
        missing = [s for s in self.config.emb_sources if s not in self._captured]
        if missing:
            raise RuntimeError(f"guidance adapter: the base did not compute {missing} before its attention blocks.")
        return sum(self._captured[s] for s in self.config.emb_sources)

    def _conditioning(self, batch: int, device, dtype) -> dict[str, torch.Tensor]:
        """Per-call tensors shared by all blocks (computed once per base forward)."""
        if "e" not in self._cache:
            emb = self._embedding().to(dtype)
            if emb.shape[0] != batch:
                emb = emb.expand(batch, -1) if emb.shape[0] == 1 else emb
            w = self.omega_embedding(self._omega_rows(batch, device)).to(dtype)
            if self.config.variant == "attention":
                self._cache["e"] = torch.stack([w, self.emb_proj(emb)], dim=1)  # [B, 2, width]
            else:
                self._cache["e"] = w + emb
        return self._cache

    def _block_hook(self, name: str):
        key = _key(name)

        def hook(module, args, kwargs, output):
            if not self.enabled or not isinstance(output, torch.Tensor):
                return None
            x = args[0] if args else kwargs["hidden_states"]
            ctx = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            delta = self._delta(key, x, ctx)
            return output + delta.to(output.dtype)
        return hook

    def _delta(self, key: str, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        dtype = self.omega_embedding.mlp[0].weight.dtype
        batch = x.shape[0]
        cache = self._conditioning(batch, x.device, dtype)
        block = self.blocks[key]
        spatial = x.ndim == 4
        if self.config.variant == "additive":
            e = cache["e"]
            if self.context_proj is not None and context is not None:
                e = e + self.context_proj(context.to(dtype).mean(dim=1))
            offset = block(e)
            return offset[:, :, None, None] if spatial else offset[:, None, :]
        tokens = x.flatten(2).transpose(1, 2) if spatial else x
        ctx = cache["e"]
        if self.context_proj is not None and context is not None:
            ctx = torch.cat([ctx, self.context_proj(context.to(dtype))], dim=1)
        out = block(tokens.to(dtype), ctx)
        return out.transpose(1, 2).reshape(x.shape) if spatial else out

    # ------------------------------------------------------------------ facts and files
    def num_parameters_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def trainable_share(self, model: torch.nn.Module | None = None) -> float:
        """Adapter parameters / base parameters (the paper's "extra parameters")."""
        model = model if model is not None else self.base
        if model is None:
            raise ValueError("trainable_share needs the base model (attach the adapter or pass model=).")
        return self.num_parameters_trainable() / sum(p.numel() for p in model.parameters())

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """``config.json`` + ``diffusion_pytorch_model.safetensors`` (Fourier buffers included), written into a
        temporary folder and renamed into place (a killed save never leaves a half-written adapter)."""
        import shutil

        folder = Path(save_directory)
        tmp = folder.with_name(folder.name + ".tmp-adapter")
        shutil.rmtree(tmp, ignore_errors=True)
        kwargs.setdefault("safe_serialization", True)
        super().save_pretrained(tmp, **kwargs)
        if folder.exists():
            for item in tmp.iterdir():  # replace file by file (the folder may hold other files, e.g. a checkpoint)
                os.replace(item, folder / item.name)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            folder.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, folder)


def resolve_adapter_folder(path: str | os.PathLike, name: str = "path_or_folder") -> Path:
    """The adapter folder of ``path``: ``builtin:<name>``, an adapter folder (``config.json`` + weights), its
    ``.safetensors`` file, or a training run folder (its exported ``student/`` adapter). ``name``: the argument
    named in the error."""
    text = str(path)
    if text.startswith("builtin:"):
        from .builtin import builtin_path

        p = builtin_path(text.split(":", 1)[1])
    else:
        p = Path(path)
    if p.is_file() and p.suffix == ".safetensors":
        p = p.parent
    for candidate in (p, p / "student"):
        if (candidate / CONFIG_NAME).is_file() and any(candidate.glob("*.safetensors")):
            cfg = candidate / CONFIG_NAME
            import json

            if json.loads(cfg.read_text()).get("_class_name") == GuidanceAdapter.__name__:
                return candidate
    raise FileNotFoundError(f"{name}: {text!r} holds no guidance adapter (builtin:digits-agd, a folder with "
                            f"config.json of class GuidanceAdapter and its .safetensors weights, or a training run "
                            f"folder).")


def load_guidance_adapter(path: str | os.PathLike) -> GuidanceAdapter:
    """Load a saved :class:`GuidanceAdapter` (see :func:`resolve_adapter_folder` for accepted paths)."""
    return GuidanceAdapter.from_pretrained(str(resolve_adapter_folder(path)))


class AdapterGuidance(LoopHooks):
    """The one-pass guider a pipeline runs with an adapter loaded: the CFG guider's own step window (``start``/
    ``stop`` of :class:`~fastgen.guidance.CFG`, the noise interval of :class:`~fastgen.guidance.CFGInterval`)
    decides where guidance applies, and there the adapter runs at the CFG scale; elsewhere the adapter is
    switched off, so those steps are the base's conditional output exactly (CFG at scale 1). Every step is one
    network evaluation. Dropping guidance for the last steps (Adaptive Guidance's observation, Castillo et al.
    2023, arXiv:2312.12487) is ``guidance=CFG(guidance_scale=w, stop=0.7)``.
    """

    wants_conditional_forward = False

    def __init__(self, adapter: GuidanceAdapter, guider):
        self.adapter, self.inner = adapter, guider
        self.scale = float(guider.guidance_scale)

    # the loop's hooks (fastgen.guidance.base.LoopHooks), forwarded to the CFG guider that owns the window
    def prepare_call(self, **kwargs) -> None:
        self.inner.prepare_call(**kwargs)

    def begin_run(self, *args, **kwargs) -> None:
        self.inner.begin_run(*args, **kwargs)

    def reset_run_state(self) -> None:
        self.inner.reset_run_state()

    def set_state(self, step: int, num_inference_steps: int, timestep) -> None:
        self.inner.set_state(step=step, num_inference_steps=num_inference_steps, timestep=timestep)

    def set_model_input(self, context) -> None:
        """Called once per evaluation after ``set_state``: switch the adapter on (at the scale, per row where the
        window is per row) or off for this evaluation."""
        self.inner.set_model_input(context)
        active = self.inner.num_conditions == 2
        self.adapter.enabled = active
        if active:
            rows = self.inner.uncond_rows()
            if rows is None or bool(rows.all()):
                self.adapter.set_guidance_scale(self.scale)
            else:
                self.adapter.set_guidance_scale(torch.where(rows.cpu(), self.scale, 1.0))

    def uncond_rows(self):
        return None

    def step_record(self) -> dict[str, Any]:
        return {"adapter": bool(self.adapter.enabled)}

    def combines_linearly(self) -> bool:
        return True

    @property
    def num_conditions(self) -> int:
        return 1

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None):
        raise RuntimeError("AdapterGuidance runs one conditional evaluation per step; there is nothing to combine.")


@contextlib.contextmanager
def _adapter_call(adapter: GuidanceAdapter, omega: float | None) -> Iterator[None]:
    """One pipeline call: ``omega`` set (``None``: switched off, the base exactly); restored afterwards."""
    old_omega, old_enabled = adapter._omega, adapter.enabled
    if omega is None:
        adapter.enabled = False
    else:
        adapter.set_guidance_scale(omega)
    try:
        yield
    finally:
        adapter._omega, adapter.enabled = old_omega, old_enabled


def one_pass_guidance(adapter: GuidanceAdapter, guider) -> tuple[AdapterGuidance | None, Any]:
    """What a pipeline runs with an adapter loaded: a one-evaluation-per-step guider (or ``None``) and a context
    for the call. Without guidance (``guider=None``, scale 1) the adapter is off: the base's conditional output,
    exactly as CFG at scale 1. With plain CFG (``start``/``stop`` windows allowed) or CFGInterval the adapter
    runs at the CFG scale inside the guider's window and is off outside (:class:`AdapterGuidance`). Other
    guiders, and CFG with ``guidance_rescale``, are refused."""
    from .guidance import CFG, CFGInterval

    base = adapter.base
    if base is not None:  # the pipeline may have moved (pipe.to) after loading
        adapter.match(base)
    if guider is None:
        return None, _adapter_call(adapter, None)
    if type(guider) not in (CFG, CFGInterval) or getattr(guider, "guidance_rescale", 0.0) > 0:
        raise ValueError(f"guidance: a loaded guidance adapter replaces plain CFG (guidance=None, 'cfg', a CFG "
                         f"object with a start/stop window, or 'cfg-interval'; no guidance_rescale); got "
                         f"{type(guider).__name__}. Call pipe.unload_guidance_adapter() to use other guidance methods.")
    return AdapterGuidance(adapter, guider), _adapter_call(adapter, float(guider.guidance_scale))
