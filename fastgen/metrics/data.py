"""Image sources for evaluation: image folders and the built-in digits splits, as tensors in [0, 1].

Every error names the argument the value came from (``argument=``), so the CLI and the library report
bad input the same way.
"""
from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["IMAGE_EXTENSIONS", "DIGITS_SPLITS", "list_image_folder", "check_image_files", "load_images",
           "parse_builtin_data", "builtin_digits"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
DIGITS_SPLITS = ("train", "heldout", "features", "all")


def list_image_folder(folder: str | Path, argument: str = "folder") -> list[Path]:
    """Sorted image files of ``folder`` (recursive); errors name the argument and the folder."""
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"{argument} folder {str(path)!r} does not exist.")
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"{argument} folder {str(path)!r} contains no images ({', '.join(IMAGE_EXTENSIONS)}).")
    return files


def check_image_files(files: list[Path], argument: str = "images") -> tuple[int, int, str]:
    """Read every header; return ``(width, height, mode)`` or fail naming the unreadable or odd-sized file.

    ``mode`` is ``"L"`` when every file is grey-scale, else ``"RGB"``.
    """
    import PIL.Image

    first = None
    modes = set()
    for f in files:
        try:
            with PIL.Image.open(f) as im:
                size, mode = im.size, im.mode
        except Exception as err:
            raise ValueError(f"{argument}: cannot read image file {str(f)!r}: {err}") from err
        if first is None:
            first = (f, size)
        elif size != first[1]:
            raise ValueError(f"{argument}: images must all have the same size; {str(f)!r} is {size[0]}x{size[1]} but "
                             f"{str(first[0])!r} is {first[1][0]}x{first[1][1]}.")
        modes.add(mode)
    grey = modes <= {"L", "1", "I", "I;16", "F", "LA"}
    return first[1][0], first[1][1], "L" if grey else "RGB"


def load_images(files: list[Path], mode: str, argument: str = "images") -> torch.Tensor:
    """Images ``[N, C, H, W]`` float32 in [0, 1] (C = 1 for mode ``"L"``, 3 otherwise)."""
    import numpy as np
    import PIL.Image

    out = []
    for f in files:
        try:
            with PIL.Image.open(f) as im:
                array = np.asarray(im.convert(mode), dtype=np.float32) / 255.0
        except Exception as err:
            raise ValueError(f"{argument}: cannot read image file {str(f)!r}: {err}") from err
        out.append(torch.from_numpy(array).reshape(array.shape[0], array.shape[1], -1).permute(2, 0, 1))
    return torch.stack(out)


def parse_builtin_data(spec: str, argument: str = "data") -> str | None:
    """``builtin:digits[:split]`` -> split name (default ``train``); ``None`` if ``spec`` is not a builtin dataset."""
    if not isinstance(spec, str) or not spec.startswith("builtin:"):
        return None
    parts = spec.split(":")
    if parts[1] != "digits" or len(parts) > 3:
        raise ValueError(f"{argument} builtin dataset must be builtin:digits[:{'|'.join(DIGITS_SPLITS)}], got {spec!r}.")
    split = parts[2] if len(parts) == 3 else "train"
    if split not in DIGITS_SPLITS:
        raise ValueError(f"{argument} split must be one of {list(DIGITS_SPLITS)}, got {split!r}.")
    return split


def builtin_digits(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Built-in digits split as ``(images [N, 1, 16, 16] in [0, 1], labels [N])``."""
    from ..datasets import load_digits_images

    images, labels = load_digits_images(split, size=16)
    return (images + 1) / 2, labels
