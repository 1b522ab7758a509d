"""Sample image grids of a round, with each image's prompt and score, for RUN_DIR/samples/ and wandb."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw


def write_grid(
    path: str | Path,
    images: np.ndarray | Sequence[np.ndarray],
    captions: Sequence[str],
    columns: int = 8,
    caption_height: int = 14,
) -> Path:
    """Tile uint8 images (B, H, W, 3), or a list of (H_i, W_i, 3) (a multi-aspect round), in a grid of cells of
    the largest size, each with a one-line caption under it; returns the path."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    b, h, w = len(images), max(im.shape[0] for im in images), max(im.shape[1] for im in images)
    cols = min(columns, b)
    rows = -(-b // cols)
    cell_h = h + caption_height
    grid = Image.new("RGB", (cols * w, rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, cap) in enumerate(zip(images, captions)):
        x, y = (i % cols) * w, (i // cols) * cell_h
        grid.paste(Image.fromarray(img), (x, y))
        draw.text((x + 2, y + h + 1), cap[: max(w // 6, 4)], fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
