"""Labelled image grids: every picture the toolkit writes says what each image is.

One function draws them all (sample, eval, demo, attack, the training samples): a title, a head over each
column (a prompt, "before"/"after"), a label before each row (a digit, a seed, a method), the images
scaled up to at least `cell` pixels so that a 32-pixel digit can be seen. Pillow draws the text; no
plotting library is needed.
"""

from __future__ import annotations

import math
from typing import Sequence

MIN_CELL = 128


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int, lines: int) -> list[str]:
    """`text` in at most `lines` lines of at most `width` pixels (the last one cut with '...')."""
    words, out, line = str(text).split(), [], ""
    for word in words:
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            out.append(line)
            line = word
    if line:
        out.append(line)
    if len(out) > lines:
        out = out[:lines]
        out[-1] += " ..."
    cut = []
    for s in out:  # a single long word: cut by characters
        while draw.textlength(s, font=font) > width and len(s) > 4:
            s = s[:-5] + "..."
        cut.append(s)
    return cut


def labelled_grid(rows: Sequence[Sequence], *, column_heads: Sequence[str] | None = None,
                  row_labels: Sequence[str] | None = None, title: str = "", cell: int = MIN_CELL,
                  head_lines: int = 3, label_width: int = 0):
    """A grid of PIL images (None leaves a cell blank), rows as given. Images are scaled (nearest neighbour
    when enlarging) to `cell` pixels on their longer side, at least their own size."""
    from PIL import Image, ImageDraw

    images = [im for row in rows for im in row if im is not None]
    if not images:
        raise ValueError("labelled_grid: no image")
    w0, h0 = images[0].size
    scale = max(1.0, cell / max(w0, h0))
    cw, ch = round(w0 * scale), round(h0 * scale)
    cols = max(len(r) for r in rows)
    font = _font(12)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = 15
    heads = [_wrap(probe, h, font, cw - 6, head_lines) for h in (column_heads or [])]
    head_h = (max((len(h) for h in heads), default=0) * line_h + 6) if heads else 0
    title_h = line_h + 8 if title else 0
    if row_labels:
        label_width = label_width or min(220, max(int(probe.textlength(str(s), font=font)) for s in row_labels) + 12)
    label_w = label_width if row_labels else 0
    pad = 2
    width = label_w + cols * (cw + pad) + pad
    height = title_h + head_h + len(rows) * (ch + pad) + pad
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((6, 4), _wrap(draw, title, font, width - 12, 1)[0], fill="black", font=font)
    for c, lines in enumerate(heads):
        for i, text in enumerate(lines):
            draw.text((label_w + pad + c * (cw + pad) + 3, title_h + 3 + i * line_h), text, fill="black", font=font)
    for r, row in enumerate(rows):
        y = title_h + head_h + pad + r * (ch + pad)
        if row_labels:
            for i, text in enumerate(_wrap(draw, row_labels[r], font, label_w - 8, max(1, ch // line_h))):
                draw.text((4, y + 3 + i * line_h), text, fill="black", font=font)
        for c, im in enumerate(row):
            if im is None:
                continue
            im = im.convert("RGB")
            if im.size != (cw, ch):
                im = im.resize((cw, ch), Image.NEAREST if scale > 1 else Image.BICUBIC)
            grid.paste(im, (label_w + pad + c * (cw + pad), y))
    return grid


def marker_scales(points: Sequence[tuple[float, float]], near: float = 0.025) -> list[tuple[float, bool]]:
    """For a scatter plot: (size factor, hollow) per point so that no marker hides another. Points closer than
    `near` of the axes' spans to an earlier one are drawn hollow and larger, one ring outside the other."""
    xs = [p[0] for p in points if math.isfinite(p[0])] or [0.0]
    ys = [p[1] for p in points if math.isfinite(p[1])] or [0.0]
    sx, sy = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    out: list[tuple[float, bool]] = []
    for i, (x, y) in enumerate(points):
        under = sum(1 for (x2, y2) in points[:i] if abs(x - x2) / sx < near and abs(y - y2) / sy < near)
        out.append((1.0 + 0.7 * under, under > 0))
    return out
