"""Real data for the GAN term, in a deterministic, resumable order.

A :class:`RealData` holds N examples (pixels in [-1, 1] or latents) and serves rows by *global
position* in an endless stream: position p reads example ``perm_e[p mod N]`` of epoch
``e = p // N``, where ``perm_e`` is a permutation drawn from ``(seed, e)``. The trainer asks for the
positions of each update's rows, which are a function of the step counter only, so a resumed run
reads exactly the rows an uninterrupted one would, whatever the number of processes.

Sources (``DistillConfig.dataset``):

- ``builtin:digits`` (and ``auto`` for the digits teacher): the teacher's own training split,
  :func:`fastgen.datasets.load_digits_images` ``("train")`` at the teacher's resolution, with labels;
- a folder of images (png/jpg/webp, searched recursively): resized (shorter side, then centre crop)
  to the resolution, read lazily; latent teachers encode them with the VAE when served;
- a ``.safetensors`` file, or a folder of them, holding ``latents`` ``[N, C, h, w]`` (already scaled
  by the VAE's scaling factor) and optionally ``labels`` ``[N]``.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def seed_from_key(*key: int) -> int:
    """A 63-bit seed from a tuple of ints (SplitMix64 chained over the key; stable across runs and platforms)."""
    h = 0x243F6A8885A308D3
    for k in key:
        h = _splitmix64(h ^ (int(k) & _MASK64))
    return h >> 1


def seeded_generator(*key: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded from a tuple of ints (:func:`seed_from_key`)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed_from_key(*key))
    return gen


class RealData:
    """N examples served by global stream position (see the module docstring).

    Args:
        fetch: ``fetch(indices: LongTensor) -> (rows, labels or None)``.
        length: N.
        seed: seed of the epoch permutations.
        is_latent: whether rows are already in the teacher's latent space.
    """

    def __init__(self, fetch, length: int, seed: int = 0, is_latent: bool = False):
        if length < 1:
            raise ValueError("dataset: the real-data source holds no examples.")
        self._fetch = fetch
        self.length = int(length)
        self.seed = int(seed)
        self.is_latent = is_latent
        self._perms: OrderedDict[int, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return self.length

    def _perm(self, epoch: int) -> torch.Tensor:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = torch.randperm(self.length, generator=seeded_generator(self.seed, 7919, epoch))
            self._perms[epoch] = perm
            while len(self._perms) > 4:
                self._perms.popitem(last=False)
        return perm

    def indices(self, start: int, count: int) -> torch.Tensor:
        """Example indices of stream positions ``start .. start + count - 1``."""
        first, last = start // self.length, (start + count - 1) // self.length
        if first == last:  # the common case: one epoch
            offset = start - first * self.length
            return self._perm(first)[offset: offset + count]
        pos = torch.arange(start, start + count, dtype=torch.long)
        epochs = pos // self.length
        out = torch.empty_like(pos)
        for epoch in epochs.unique().tolist():
            mask = epochs == epoch
            out[mask] = self._perm(int(epoch))[pos[mask] % self.length]
        return out

    def rows(self, start: int, count: int):
        """``(rows, labels or None)`` at stream positions ``start .. start + count - 1``."""
        return self._fetch(self.indices(start, count))


def _tensor_source(images: torch.Tensor, labels: torch.Tensor | None, seed: int, is_latent: bool) -> RealData:
    def fetch(idx):
        return images[idx], (labels[idx] if labels is not None else None)
    return RealData(fetch, images.shape[0], seed, is_latent)


def _image_folder(path: Path, resolution: int, channels: int, seed: int) -> RealData:
    import PIL.Image

    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"dataset: folder {str(path)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}).")

    def load(file: Path) -> torch.Tensor:
        with PIL.Image.open(file) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            w, h = im.size
            scale = resolution / min(w, h)
            im = im.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), PIL.Image.BICUBIC)
            left, top = (im.width - resolution) // 2, (im.height - resolution) // 2
            im = im.crop((left, top, left + resolution, top + resolution))
            arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(arr))

    def fetch(idx):
        return torch.stack([load(files[i]) for i in idx.tolist()]), None
    return RealData(fetch, len(files), seed, is_latent=False)


def _latent_files(path: Path, seed: int) -> RealData:
    from safetensors.torch import load_file

    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"dataset: {str(path)!r} holds no .safetensors files of latents.")
    latents, labels = [], []
    for file in files:
        data = load_file(str(file))
        if "latents" not in data:
            raise ValueError(f"dataset: {str(file)!r} has no 'latents' tensor (keys: {sorted(data)}).")
        latents.append(data["latents"].float())
        labels.append(data.get("labels"))
    lab = torch.cat(labels) if all(x is not None for x in labels) else None
    return _tensor_source(torch.cat(latents), lab, seed, is_latent=True)


def load_real_data(spec: str, *, teacher_name: str, sample_shape: tuple[int, ...], latent: bool, seed: int,
                   resolution: int | None = None) -> RealData | None:
    """The real-data source named by ``DistillConfig.dataset`` (``None`` for ``none``).

    Args:
        spec: ``auto``, ``none``, ``builtin:digits``, an image folder or a latents file/folder.
        teacher_name: ``DistillConfig.teacher`` (``auto`` maps ``builtin:digits`` to its training split).
        sample_shape: the teacher's input shape ``(C, H, W)``.
        latent: whether the teacher works on VAE latents.
        seed: the trainer seed (epoch permutations).
        resolution: pixel size of folder images (default: the teacher's sample size, times 8 for latents).
    """
    if spec == "auto":
        spec = "builtin:digits" if teacher_name == "builtin:digits" else "none"
    if spec == "none":
        return None
    if spec == "builtin:digits":
        from ..datasets import load_digits_images

        if latent:
            raise ValueError("dataset: builtin:digits is pixel data; the teacher works on latents.")
        images, labels = load_digits_images("train", size=int(sample_shape[-1]))
        if images.shape[1:] != tuple(sample_shape):
            raise ValueError(f"dataset: builtin:digits rows are {tuple(images.shape[1:])}, the teacher expects "
                             f"{tuple(sample_shape)}.")
        return _tensor_source(images, labels, seed, is_latent=False)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"dataset: {spec!r} does not exist.")
    if path.suffix == ".safetensors" or (path.is_dir() and any(path.glob("*.safetensors"))):
        return _latent_files(path, seed)
    res = resolution or int(sample_shape[-1]) * (8 if latent else 1)
    channels = 3 if latent else int(sample_shape[0])
    return _image_folder(path, res, channels, seed)
