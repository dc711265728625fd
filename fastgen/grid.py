"""Image grids with captions, for CLI output and benchmark figures."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

LINE_HEIGHT = 12  # pixels per text line of PIL's default bitmap font


def _to_pil(image) -> PIL.Image.Image:
    if isinstance(image, PIL.Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return PIL.Image.fromarray(array).convert("RGB")


def _fit(text: str, width: int, font) -> str:
    """``text`` cut (with an ellipsis) to ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…" if text else ""


def _pieces(word: str, width: int, font) -> list[str]:
    """``word`` split into pieces of at most ``width`` pixels (a word wider than a line is broken, not cut)."""
    pieces = [""]
    for char in word:
        if pieces[-1] and font.getlength(pieces[-1] + char) > width:
            pieces.append("")
        pieces[-1] += char
    return pieces


def wrap_text(text: str, width: int, font=None) -> list[str]:
    """Word-wrap ``text`` into lines of at most ``width`` pixels (a ``|`` separator ends a line, never starts
    one; a word wider than a line is broken across lines). Nothing is dropped."""
    font = font or PIL.ImageFont.load_default()
    lines: list[str] = []
    for word in text.split():
        if lines and (word == "|" or font.getlength(f"{lines[-1]} {word}") <= width):
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.extend(_pieces(word, width, font))
    return lines


def image_grid(
    images: Sequence,
    ncols: int,
    captions: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    cell_size: int = 64,
    title: str | None = None,
) -> PIL.Image.Image:
    """Tile ``images`` (PIL, or HWC arrays in [0, 1] or uint8) into a grid, upscaled with nearest
    neighbour to ``cell_size`` so small samples stay crisp; optional per-image captions (under every
    image), per-row labels on the left, and a title wrapped onto as many lines as the grid's width needs
    (never clipped)."""
    if ncols <= 0:
        raise ValueError(f"ncols must be a positive integer, got {ncols}.")
    if not images:
        raise ValueError("images must not be empty.")
    font = PIL.ImageFont.load_default()
    tiles = [_to_pil(im) for im in images]
    scale = max(1, cell_size // max(tiles[0].size))
    tiles = [t.resize((t.width * scale, t.height * scale), PIL.Image.NEAREST) for t in tiles]
    w, h = tiles[0].size
    caption_h = LINE_HEIGHT if captions and any(captions) else 0
    left = 28 if row_labels else 0
    pad = 2
    ncols = min(ncols, len(tiles))
    nrows = (len(tiles) + ncols - 1) // ncols
    width = left + ncols * (w + pad) + pad
    title_lines = wrap_text(title, width - 16, font) if title else []
    top = LINE_HEIGHT * len(title_lines) + (4 if title_lines else 0)
    canvas = PIL.Image.new("RGB", (width, top + nrows * (h + caption_h + pad) + pad), "white")
    draw = PIL.ImageDraw.Draw(canvas)
    for k, line in enumerate(title_lines):
        draw.text((4, 2 + k * LINE_HEIGHT), line, fill="black", font=font)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, ncols)
        x, y = left + pad + c * (w + pad), top + pad + r * (h + caption_h + pad)
        canvas.paste(tile, (x, y))
        if caption_h and captions[i] not in (None, ""):
            draw.text((x + 1, y + h), _fit(str(captions[i]), w - 2, font), fill="black", font=font)
    for r, label in enumerate(row_labels or []):
        draw.text((3, top + pad + r * (h + caption_h + pad) + h // 2 - 5), _fit(str(label), left - 4, font),
                  fill="black", font=font)
    return canvas
