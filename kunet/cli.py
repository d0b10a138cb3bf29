"""The kunet command line: train, predict and evaluate on image folders, and the demo.

    kunet plan     --images DIR --masks DIR [--time-budget SECONDS] [--out plan.json]
    kunet train    --images DIR --masks DIR --out RUN_DIR [--time-budget SECONDS] [--plan FILE] ...
    kunet predict  --model RUN_DIR/best.keras --images DIR|FILE --out DIR [--tile-size T] [--tta]
    kunet evaluate --model RUN_DIR/best.keras --images DIR --masks DIR [--json]

Bad input (missing partners, unreadable files, size mismatches, labels beyond the classes, NaN/inf
pixels, empty folders, an output folder that is an input folder or already holds the outputs,
unwritable outputs) ends with ``kunet: error: <message naming the file>`` on stderr and exit status
2, without a traceback and without partial outputs. A training run whose loss or weights become
NaN/inf stops with exit status 1, keeping its last good epoch. Ctrl-C stops at the next safe point
with one line and exit status 130. What had to be guessed about the data is printed as
``kunet: note: ...`` lines on stderr, even under --quiet (--strict refuses to guess).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _fraction(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def _add_safety(p, writes=True):
    """The options every data command shares: NaN policy, strictness, and --overwrite if it writes."""
    from kunet.io import NAN_POLICIES

    p.add_argument(
        "--nan-policy",
        choices=NAN_POLICIES,
        default="error",
        help="NaN/inf pixels in an image: error (default: refuse, naming the file), zero (set to "
        "0 after normalization) or ignore (pass them on)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="refuse to guess (number of classes, channel conversions, 0/255 masks) instead of "
        "saying what was guessed",
    )
    if writes:
        p.add_argument(
            "--overwrite",
            action="store_true",
            help="replace files already in the output folder (default: refuse)",
        )


def _add_data(p):
    p.add_argument("--images", required=True, help="folder of images (png, jpg, tif)")
    p.add_argument("--masks", required=True, help="folder of class-index masks, same file stems")
    p.add_argument(
        "--num-classes",
        type=_positive_int,
        default=None,
        help="classes including background (2 = binary); default: largest mask label + 1",
    )
    p.add_argument(
        "--time-budget",
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help="training time: the learning rate anneals as it runs out; the best checkpoint is kept",
    )


def _add_plan_overrides(p):
    """The plan's settings a command line may set (each default: the plan's)."""
    p.add_argument("--epochs", type=_positive_int, help="total epochs of the run")
    p.add_argument("--patch-size", type=_positive_int, help="training patch side in pixels")
    p.add_argument("--batch-size", type=_positive_int, help="patches per step")
    p.add_argument("--val-split", type=_fraction, help="fraction of images held out")
    p.add_argument("--filters", type=_positive_int, nargs="+", help="filters per encoder stage")
    p.add_argument(
        "--set",
        action="extend",
        nargs="+",
        default=[],
        metavar="NAME=VALUE",
        help="any other plan settings, e.g. --set augmentation=light foreground=0.5 (see kunet plan)",
    )


def _overrides(args):
    from kunet.plan import parse_overrides

    settings = parse_overrides(args.set)
    for name in ("epochs", "patch_size", "batch_size", "val_split"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    if args.filters is not None:
        settings["filters"] = list(args.filters)
    return settings


def _add_plan(sub):
    p = sub.add_parser(
        "plan",
        help="derive a training plan from an images/ + masks/ folder pair",
        description="Read the dataset (sizes, channels, intensities, class frequencies, object "
        "sizes) and derive every training setting from it; print the plan and write it as JSON "
        "for kunet train --plan.",
    )
    _add_data(p)
    _add_plan_overrides(p)
    p.add_argument("--out", default=None, help="plan file to write (default: print it only)")
    _add_safety(p)
    p.set_defaults(func=_run_plan)


def _run_plan(args):
    import keras

    from kunet import plan as kplan
    from kunet.data import load_folder
    from kunet.dispatch import has_accelerator
    from kunet.io import DataError, Guesses
    from kunet.outputs import atomic_write_bytes, check_existing, check_separate, check_writable

    settings = _overrides(args)
    if args.out:
        out = Path(args.out)
        check_separate(out, [("images", args.images), ("masks", args.masks)], "--out file")
        if out.is_dir():
            raise DataError(f"--out {out} is a folder; give the plan file's path")
    guesses = Guesses(args.strict)
    data = load_folder(
        args.images, args.masks, num_classes=args.num_classes, nan_policy=args.nan_policy,
        guesses=guesses, normalization=None,
    )  # fmt: skip
    plan = kplan.make_plan(
        kplan.fingerprint(data),
        time_budget=args.time_budget,
        backend=keras.backend.backend(),
        gpu=has_accelerator(),
    )
    plan["settings"].update(settings)
    plan["reasons"].update({k: "set by the user" for k in settings})
    kplan.check_settings(plan["settings"], "plan")
    for line in guesses.lines():
        print(f"kunet: note: {line}", file=sys.stderr)
    fp = plan["fingerprint"]
    print(
        f"{fp['images']} image(s), {fp['channels']} channel(s), {fp['num_classes']} classes, "
        f"median {fp['height']['median']:g}x{fp['width']['median']:g}; class fractions "
        f"{fp['class_fractions']}"
    )
    for line in kplan.table(plan):
        print(line)
    if args.out:
        check_writable(out.parent, "--out folder")
        check_existing(out.parent, [out.name], args.overwrite, "--out folder")
        atomic_write_bytes(out, (json.dumps(plan, indent=1) + "\n").encode())
        print(f"-> {out}")
    return 0


def _add_train(sub):
    p = sub.add_parser(
        "train",
        help="train a UNet on an images/ + masks/ folder pair",
        description="Plan the run from the data (or take --plan), train on random augmented "
        "patches, keep the best model by validation Dice.",
    )
    _add_data(p)
    p.add_argument("--out", required=True, help="run folder (best.keras, plan, history, overlays)")
    p.add_argument("--plan", default=None, help="a plan file from kunet plan (default: plan now)")
    _add_plan_overrides(p)
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_safety(p)
    p.set_defaults(func=_run_train)


def _run_train(args):
    from kunet import train as t

    t.train(
        args.images,
        args.masks,
        args.out,
        plan=args.plan,
        settings=_overrides(args),
        num_classes=args.num_classes,
        time_budget=args.time_budget,
        seed=args.seed,
        resume=args.resume,
        overwrite=args.overwrite,
        nan_policy=args.nan_policy,
        strict=args.strict,
        verbose=0 if args.quiet else 1,
    )
    return 0


def _add_predict(sub):
    p = sub.add_parser(
        "predict",
        help="write class-index masks and overlays for images",
        description="Predict every image (tiled when larger than a tile): <stem>.png holds class "
        "indices (palette PNG), <stem>_overlay.png shows them on the image.",
    )
    p.add_argument("--model", required=True, help="a .keras model (e.g. RUN_DIR/best.keras)")
    p.add_argument("--images", required=True, help="an image file or a folder of images")
    p.add_argument("--out", required=True, help="output folder")
    _add_inference(p)
    p.add_argument("--quiet", action="store_true", help="print no progress")
    _add_safety(p)
    p.set_defaults(func=_run_predict)


def _add_inference(p):
    """The inference settings predict and evaluate share (each default: the plan's)."""
    p.add_argument(
        "--tile-size",
        type=_positive_int,
        default=None,
        help="tile side for large images (default: the plan's, else 256)",
    )
    p.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="average predictions over flips (default: as the plan beside the model measured)",
    )


def _run_predict(args):
    from kunet import train as t

    t.predict(
        args.model,
        args.images,
        args.out,
        tile_size=args.tile_size,
        tta=args.tta,
        overwrite=args.overwrite,
        nan_policy=args.nan_policy,
        strict=args.strict,
        verbose=0 if args.quiet else 1,
    )
    return 0


def _add_evaluate(sub):
    p = sub.add_parser(
        "evaluate",
        help="Dice and IoU of a model on an images/ + masks/ folder pair",
        description="Dice and IoU per class over all pixels, and their mean over foreground classes.",
    )
    p.add_argument("--model", required=True, help="a .keras model (e.g. RUN_DIR/best.keras)")
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--masks", required=True, help="folder of class-index masks, same file stems")
    _add_inference(p)
    p.add_argument("--json", action="store_true", help="print the scores as one JSON line last")
    _add_safety(p, writes=False)
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args):
    from kunet import train as t

    scores = t.evaluate(
        args.model,
        args.images,
        args.masks,
        tile_size=args.tile_size,
        tta=args.tta,
        nan_policy=args.nan_policy,
        strict=args.strict,
    )
    print(f"{scores['images']} image(s), {scores['num_classes']} classes")
    print(f"{'class':>6} {'dice':>8} {'iou':>8}")
    for c in scores["dice"]:
        print(f"{c:>6} {scores['dice'][c]:8.4f} {scores['iou'][c]:8.4f}")
    print(f"{'fg mean':>6} {scores['mean_dice']:8.4f} {scores['mean_iou']:8.4f}")
    if args.json:
        print(json.dumps(scores), flush=True)
    return 0


def main(argv=None) -> int:
    """``kunet ...``: the exit status (0 ok, 1 training diverged or --require-dice missed, 2 bad
    input, 130 Ctrl-C)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before a command started (imports, argument parsing)
        print("kunet: interrupted", file=sys.stderr, flush=True)
        return 130


def _main(argv):
    parser = argparse.ArgumentParser(
        prog="kunet",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    from kunet import demo

    demo.add_arguments(sub.add_parser("demo", help=demo.__doc__.splitlines()[0]))
    _add_plan(sub)
    _add_train(sub)
    _add_predict(sub)
    _add_evaluate(sub)
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parser.parse_args(argv)

    from kunet.callbacks import NonFiniteError
    from kunet.io import DataError

    try:
        return int(args.func(args) or 0)
    except DataError as e:
        print(f"kunet: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"kunet: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. a disk that fills up or a folder made read-only mid-run
        where = f"{e.filename}: " if e.filename else ""
        print(f"kunet: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"kunet: {_interrupted(e, args.command, argv)}", file=sys.stderr, flush=True)
        return 130


def _interrupted(e, command, argv):
    """The one line printed after Ctrl-C: where it stopped and, for train, how to resume."""
    said = " ".join(str(e).split()) or "interrupted"
    if command == "train" and getattr(e, "epoch", None) is not None:
        again = [a for a in argv if a != "--overwrite"]
        if "--resume" not in again:
            again.append("--resume")
        return f"{said}; resume with: {shlex.join(['kunet', *again])}"
    return said


if __name__ == "__main__":
    sys.exit(main())
