"""Make a small real folder dataset: fluorescence nuclei with their hand-made ground truth.

The data is the 512x512 fluorescence image and its annotated nucleus labels from the 2018 Data Science
Bowl (Caicedo et al., Nature Methods 2019) that the ``stardist`` package ships inside its wheel
(``stardist/data/images/img2d.tif`` and ``mask2d.tif``); nothing is downloaded at run time. Only the
files are read: stardist itself (and its TensorFlow dependencies) is never imported, so
``pip install --no-deps stardist`` is enough.

The image is cut into a 4x4 grid of 128x128 tiles. The 12 tiles of the left three columns go to
``OUT/train/{images,masks}``; the 4 tiles of the right column, never seen in training, go to
``OUT/test/{images,masks}``. Images are written as 16-bit PNGs (as stored), masks as 0/255 PNGs
(nucleus = any instance label > 0).

    python examples/nuclei_folder.py data/nuclei
    kunet train    --images data/nuclei/train/images --masks data/nuclei/train/masks --out runs/nuclei
    kunet predict  --model runs/nuclei/best.keras --images data/nuclei/test/images --out pred/nuclei
    kunet evaluate --model runs/nuclei/best.keras --images data/nuclei/test/images \\
                   --masks data/nuclei/test/masks --json
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
from PIL import Image

TILE = 128


def stardist_files():
    spec = importlib.util.find_spec("stardist")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        sys.exit(
            "examples/nuclei_folder.py: needs the stardist wheel's data: pip install --no-deps stardist"
        )
    images = Path(spec.submodule_search_locations[0]) / "data" / "images"
    return images / "img2d.tif", images / "mask2d.tif"


def read_tiff(path):
    try:
        import tifffile

        return np.asarray(tifffile.imread(str(path)))
    except ImportError:
        return np.asarray(Image.open(path))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to create (train/ and test/ inside)")
    args = parser.parse_args(argv)
    image_path, mask_path = stardist_files()
    image = read_tiff(image_path).astype("uint16")
    labels = read_tiff(mask_path)
    assert image.shape == labels.shape == (512, 512), (image.shape, labels.shape)
    out = Path(args.out)
    for split in ("train", "test"):
        for kind in ("images", "masks"):
            (out / split / kind).mkdir(parents=True, exist_ok=True)
    for row in range(512 // TILE):
        for col in range(512 // TILE):
            split = "test" if col == 3 else "train"
            window = np.s_[row * TILE : (row + 1) * TILE, col * TILE : (col + 1) * TILE]
            name = f"dsb_r{row}c{col}.png"
            Image.fromarray(image[window]).save(out / split / "images" / name)  # 16-bit PNG
            mask = np.where(labels[window] > 0, 255, 0).astype("uint8")
            Image.fromarray(mask).save(out / split / "masks" / name)
    print(f"wrote 12 training and 4 test tiles ({TILE}x{TILE}) under {out}")


if __name__ == "__main__":
    main()
