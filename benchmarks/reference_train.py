"""The quality reference: a plain PyTorch UNet trained with its usual recipe for a wall-clock budget.

What a PyTorch user would write for a folder of images and masks (the recipe of shared/DESIGN.md,
section 7): ``reference_unet.UNet`` (filters 16-128, BN DoubleConv, ConvTranspose up, channels_last),
Adam 1e-3 constant, batches of 8 random 96x96 crops from all training images (no validation split),
random horizontal/vertical flips and 90-degree rotations, images divided by 255 (also 16-bit ones,
as the recipe is usually written; batch norm after the first convolution takes out the scale), loss BCE-with-logits + soft Dice over the batch (binary) or CE + mean soft
Dice over the classes (multi-class), trained until the budget runs out (counted from the first
step; data loading and model set-up are not counted). Test images are predicted whole (reflect-padded
to a multiple of 16); the score is kunet evaluate's: Dice per class over all test pixels, mean over
the foreground classes.

    python benchmarks/reference_train.py --train DIR --test DIR --budget 180 --seed 0

prints one JSON line: {"dice": ..., "per_class": [...], "steps": ..., "train_s": ..., ...}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_unet import UNet  # noqa: E402

CROP = 96
BATCH = 8
SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


def _read(path):
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        return np.asarray(tifffile.imread(str(path)))
    with Image.open(path) as im:
        return np.asarray(im)


def load(folder, num_classes=None):
    """(images [(H, W, C) float32 / 255], masks [(H, W) int64]) of FOLDER/images, FOLDER/masks."""
    images, masks = [], []
    for path in sorted(p for p in (folder / "images").iterdir() if p.suffix.lower() in SUFFIXES):
        image = (
            _read(path).astype("float32") / 255.0
        )  # the recipe's scaling, whatever the bit depth
        images.append(image[..., None] if image.ndim == 2 else image[..., :3])
        mask_path = next(p for p in (folder / "masks").iterdir() if p.stem == path.stem)
        mask = _read(mask_path).astype("int64")
        if mask.max() in (255, 65535) and len(np.unique(mask)) <= 2:
            mask = (mask > 0).astype("int64")  # a 0/255 binary mask
        masks.append(mask)
    return images, masks


def _crop(image, mask, rng):
    h, w = mask.shape
    if h < CROP or w < CROP:
        ph, pw = max(0, CROP - h), max(0, CROP - w)
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="reflect")
        mask = np.pad(mask, ((0, ph), (0, pw)), mode="reflect")
        h, w = mask.shape
    y, x = rng.integers(0, h - CROP + 1), rng.integers(0, w - CROP + 1)
    image, mask = image[y : y + CROP, x : x + CROP], mask[y : y + CROP, x : x + CROP]
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    if rng.random() < 0.5:
        image, mask = image[::-1], mask[::-1]
    k = int(rng.integers(4))
    return np.rot90(image, k), np.rot90(mask, k)


def batch(images, masks, rng):
    picks = [_crop(images[i], masks[i], rng) for i in rng.integers(0, len(images), BATCH)]
    x = torch.from_numpy(np.stack([p[0] for p in picks]).copy()).permute(0, 3, 1, 2)
    y = torch.from_numpy(np.stack([p[1] for p in picks]).copy())
    return x.contiguous(memory_format=torch.channels_last), y


def loss_fn(logits, y, num_classes):
    if num_classes == 2:
        target = y[:, None].float()
        probs = torch.sigmoid(logits)
        inter = (probs * target).sum()
        dice = (2 * inter + 1) / (probs.sum() + target.sum() + 1)
        return F.binary_cross_entropy_with_logits(logits, target) + 1 - dice
    probs = torch.softmax(logits, dim=1)
    onehot = F.one_hot(y, num_classes).permute(0, 3, 1, 2).float()
    inter = (probs * onehot).sum((0, 2, 3))
    dice = (2 * inter + 1) / (probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3)) + 1)
    return F.cross_entropy(logits, y) + 1 - dice.mean()


@torch.no_grad()
def predict(model, image, num_classes):
    h, w = image.shape[:2]
    ph, pw = -h % 16, -w % 16
    padded = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="reflect")
    x = (
        torch.from_numpy(padded)
        .permute(2, 0, 1)[None]
        .contiguous(memory_format=torch.channels_last)
    )
    logits = model(x)[0, :, :h, :w]
    if num_classes == 2:
        return (logits[0] > 0).long().numpy()
    return logits.argmax(0).numpy()


def evaluate(model, images, masks, num_classes):
    tp, fp, fn = (np.zeros(num_classes) for _ in range(3))
    model.eval()
    for image, mask in zip(images, masks, strict=True):
        pred = predict(model, image, num_classes)
        for c in range(num_classes):
            p, t = pred == c, mask == c
            tp[c] += np.count_nonzero(p & t)
            fp[c] += np.count_nonzero(p & ~t)
            fn[c] += np.count_nonzero(~p & t)
    denominator = 2 * tp + fp + fn
    dice = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 1.0)
    return float(dice[1:].mean()), dice.tolist()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=Path, required=True, help="folder with images/ and masks/")
    parser.add_argument("--test", type=Path, required=True, help="folder with images/ and masks/")
    parser.add_argument("--budget", type=float, default=180.0, help="training seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-classes", type=int, default=None, help="default: largest label + 1")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    images, masks = load(args.train)
    test_images, test_masks = load(args.test)
    num_classes = args.num_classes or max(2, int(max(m.max() for m in masks + test_masks)) + 1)
    model = UNet(images[0].shape[-1], 1 if num_classes == 2 else num_classes, (16, 32, 64, 128))
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.budget:
        x, y = batch(images, masks, rng)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y, num_classes)
        loss.backward()
        optimizer.step()
        steps += 1
    train_s = time.perf_counter() - start
    dice, per_class = evaluate(model, test_images, test_masks, num_classes)
    print(json.dumps({"dice": dice, "per_class": per_class, "steps": steps,
                      "train_s": round(train_s, 1), "num_classes": num_classes,
                      "threads": torch.get_num_threads()}))  # fmt: skip


if __name__ == "__main__":
    main()
