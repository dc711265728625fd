"""Image grids with captions, for CLI output and benchmark figures."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import PIL.Image
import PIL.ImageDraw


def _to_pil(image) -> PIL.Image.Image:
    if isinstance(image, PIL.Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return PIL.Image.fromarray(array).convert("RGB")


def image_grid(
    images: Sequence,
    ncols: int,
    captions: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    cell_size: int = 64,
    title: str | None = None,
) -> PIL.Image.Image:
    """Tile ``images`` (PIL, or HWC arrays in [0, 1] or uint8) into a grid, upscaled with nearest
    neighbour to ``cell_size`` so small samples stay crisp; optional per-image captions, per-row
    labels on the left, and a title line."""
    if ncols <= 0:
        raise ValueError(f"ncols must be a positive integer, got {ncols}.")
    if not images:
        raise ValueError("images must not be empty.")
    tiles = [_to_pil(im) for im in images]
    scale = max(1, cell_size // max(tiles[0].size))
    tiles = [t.resize((t.width * scale, t.height * scale), PIL.Image.NEAREST) for t in tiles]
    w, h = tiles[0].size
    caption_h = 12 if captions and any(captions) else 0
    left = 28 if row_labels else 0
    top = 16 if title else 0
    pad = 2
    nrows = (len(tiles) + ncols - 1) // ncols
    canvas = PIL.Image.new("RGB", (left + ncols * (w + pad) + pad, top + nrows * (h + caption_h + pad) + pad), "white")
    draw = PIL.ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill="black")
    for i, tile in enumerate(tiles):
        r, c = divmod(i, ncols)
        x, y = left + pad + c * (w + pad), top + pad + r * (h + caption_h + pad)
        canvas.paste(tile, (x, y))
        if caption_h:
            draw.text((x + 1, y + h), str(captions[i])[: max(1, w // 6)], fill="black")
    for r, label in enumerate(row_labels or []):
        draw.text((3, top + pad + r * (h + caption_h + pad) + h // 2 - 5), str(label)[:4], fill="black")
    return canvas
