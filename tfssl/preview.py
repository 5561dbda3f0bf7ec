"""``tfssl preview``: a PNG grid of a few images (first column) and their views, to see a recipe."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from tfssl import data, methods


def preview(cfg, out, count=8, cell=64):
    """Write a grid: one row per image, the original then each view of the recipe's method. Returns the path."""
    source = data.load_source(cfg.data)
    images = next(iter(source.train.batch(count)))["image"]
    views = methods.views_for(cfg)(images)
    columns = [images.numpy().astype("float32") / 255.0] + [v.numpy() for v in views]
    grid = Image.new("RGB", (cell * len(columns) + 4 * (len(columns) - 1), cell * count), "white")
    for c, col in enumerate(columns):
        for r in range(count):
            tile = np.clip(col[r] * 255.0, 0, 255).astype("uint8")
            tile = tile[..., 0] if tile.shape[-1] == 1 else tile
            grid.paste(Image.fromarray(tile).convert("RGB").resize((cell, cell), Image.NEAREST),
                       (c * (cell + 4), r * cell))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp.png"
    grid.save(tmp)
    os.replace(tmp, out)
    return out
