"""Compose docs/nuclei_overlay.png: ground truth (top row) and prediction (bottom row) overlays.

    python examples/readme_figure.py data/nuclei/test pred/nuclei docs/nuclei_overlay.png

``TEST`` is the test folder written by ``examples/nuclei_folder.py`` (images/ and masks/), ``PRED`` the
output folder of ``kunet predict`` on ``TEST/images``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from kunet import io


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("test", type=Path)
    parser.add_argument("pred", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    rows = [[], []]
    for image_path in io.list_images(args.test / "images"):
        image = io.read_image(image_path)
        truth = io.read_mask(args.test / "masks" / image_path.name)
        pred = io.read_mask(args.pred / f"{image_path.stem}.png")
        rows[0].append(io.overlay(image, truth, 2))
        rows[1].append(io.overlay(image, pred, 2))
    gap = 4

    def strip(tiles):
        white = np.full((tiles[0].shape[0], gap, 3), 255, "uint8")
        parts = [p for t in tiles for p in (t, white)][:-1]
        return np.concatenate(parts, axis=1)

    top, bottom = strip(rows[0]), strip(rows[1])
    figure = np.concatenate([top, np.full((gap, top.shape[1], 3), 255, "uint8"), bottom], axis=0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    # A 128-colour palette keeps the README picture small (~100 KB) with no visible loss.
    picture = Image.fromarray(figure, mode="RGB").quantize(128, method=Image.Quantize.MEDIANCUT)
    picture.save(args.out, optimize=True)
    print(f"wrote {args.out} ({figure.shape[1]}x{figure.shape[0]})")


if __name__ == "__main__":
    main()
