"""The kunet command line: train, predict and evaluate on image folders, and the demo.

    kunet plan     --images DIR --masks DIR [--time-budget SECONDS] [--out plan.json] [--3d]
    kunet train    --images DIR --masks DIR --out RUN_DIR [--time-budget SECONDS] [--plan FILE]
                   [--precision fp32|bf16|fp16] [--stream|--no-stream]
                   [--model PRESET] [--3d] [--devices N]
                   [--coordinator HOST:PORT --num-processes N --process-id I] ...
    kunet predict  --model RUN_DIR/best.keras --images DIR|FILE --out DIR [--tile-size T] [--tta]
    kunet evaluate --model RUN_DIR/best.keras --images DIR --masks DIR [--json]
    kunet demo     [--3d] [--out DIR] [--epochs N] [--time-budget SECONDS] [--require-dice DICE] ...
    kunet export   --model RUN_DIR/best.keras --format onnx|saved_model --out FILE [--verify]
    kunet convert  --torch FILE.pth --out model.keras [--layout auto|tutorial|milesial] [--overwrite]

3D volumes: folders of NIfTI (.nii, .nii.gz) or .npy volumes are read as volumes by plan and train
without being told; folders of multi-page TIFF stacks need --3d (a .tif is otherwise a 2D image).
predict and evaluate read volumes when the model is a 3D one, and write each mask in its input's
format (NIfTI with the input's affine and header).

Bad input (missing partners, unreadable files, size mismatches, labels beyond the classes, NaN/inf
pixels, empty folders, an output folder that is an input folder or already holds the outputs,
unwritable outputs) ends with ``kunet: error: <message naming the file>`` on stderr and exit status
2, without a traceback and without partial outputs. A training run whose loss or weights become
NaN/inf stops with exit status 1, keeping its last good epoch. Ctrl-C stops at the next safe point
with one line and exit status 130. What had to be guessed about the data is printed as
``kunet: note: ...`` lines on stderr, even under --quiet (--strict refuses to guess). The
frameworks' start-up log lines (TensorFlow's C++ logging) stay out of the terminal unless a command
is given --verbose or TF_CPP_MIN_LOG_LEVEL is set (:mod:`kunet._startup`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path


def _number(kind, expected, accept):
    """An argparse ``type``: the text read as ``kind`` (int or float) when ``accept(value)`` holds,
    else the error ``expected <expected>, got '<text>'``."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _number(int, "a positive integer", lambda v: v >= 1)
_positive_float = _number(float, "a positive number", lambda v: v > 0)
_fraction = _number(float, "a number in [0, 1)", lambda v: 0.0 <= v < 1.0)
_image_size = _number(int, "an image size of at least 8 pixels", lambda v: v >= 8)


def _filters(text):
    """``8,16,32`` -> (8, 16, 32): the demo's --filters."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated ints, e.g. 8,16,32; got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"filters must be positive ints; got {text!r}")
    return values


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


def _add_masks(p):
    p.add_argument("--masks", required=True, help="folder of class-index masks, same file stems")


def _add_stream(p):
    p.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="read the images from disk as they are needed (--stream) or hold them in memory "
        "(--no-stream); default: stream when their decoded size exceeds a quarter of the "
        "available memory (KUNET_MEMORY_BUDGET=bytes sets the budget)",
    )


def _add_model(p):
    p.add_argument("--model", required=True, help="a .keras model (e.g. RUN_DIR/best.keras)")


def _add_data(p):
    p.add_argument(
        "--images", required=True, help="folder of images (png, jpg, tif) or volumes (nii, npy)"
    )
    _add_masks(p)
    p.add_argument(
        "--3d",
        dest="volumes",
        action="store_true",
        default=None,
        help="read the folders as 3D volumes: needed for TIFF stacks (folders of .nii, .nii.gz or "
        ".npy files are read as volumes without it)",
    )
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


def _add_demo(sub):
    from kunet import demo

    d, d3 = demo.DEFAULTS, demo.defaults(three_d=True)

    def default(name, shown=None):
        """The help's default: the 2D one, and --3d's where it differs."""
        two, three = (shown or str)(d[name]), (shown or str)(d3[name])
        return f"default: {two}" + ("" if two == three else f"; with --3d: {three}")

    commas = lambda v: ",".join(map(str, v))  # noqa: E731
    p = sub.add_parser(
        "demo",
        help=demo.__doc__.splitlines()[0],
        description=demo.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--3d",
        dest="three_d",
        action="store_true",
        help="train a 3D UNet on synthetic volumes (kunet.synthetic.make_blobs3d) instead",
    )
    p.add_argument("--out", default=d["out"], help="output folder (default: %(default)s)")
    p.add_argument("--samples", type=_positive_int, help=f"training images ({default('samples')})")
    p.add_argument(
        "--val-samples", type=_positive_int, help=f"validation images ({default('val_samples')})"
    )
    p.add_argument(
        "--size",
        type=_image_size,
        help=f"image height and width (volume side) in pixels ({default('size')})",
    )
    p.add_argument("--epochs", type=_positive_int, help=f"training epochs ({default('epochs')})")
    p.add_argument("--batch-size", type=_positive_int, help=f"batch size ({default('batch_size')})")
    p.add_argument(
        "--filters",
        type=_filters,
        help=f"UNet encoder filters, comma-separated ({default('filters', commas)})",
    )
    p.add_argument(
        "--learning-rate",
        type=float,
        help=f"Adam learning rate, cosine-decayed to 0 ({default('learning_rate')})",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=d["seed"],
        help="seed of the data and the weights (default: %(default)s)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        help="seconds, counted from start-up (imports included), after which no new epoch "
        f"starts when it would end past them; 0 = no limit ({default('time_budget')})",
    )
    p.add_argument(
        "--examples",
        type=_positive_int,
        default=d["examples"],
        help="validation images drawn in demo.png (default: %(default)s)",
    )
    p.add_argument(
        "--require-dice",
        type=float,
        default=None,
        metavar="DICE",
        help="exit with status 1 when the validation Dice ends below DICE",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace model.keras and demo.png if --out already holds them (default: refuse)",
    )
    p.set_defaults(func=demo.run)


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
    _add_stream(p)
    _add_safety(p)
    p.set_defaults(func=_run_plan)


def _run_plan(args):
    import keras

    from kunet import plan as kplan
    from kunet.data import load_folder
    from kunet.dispatch import has_accelerator
    from kunet.io import DataError, Guesses, print_note
    from kunet.outputs import atomic_write_bytes, check_existing, check_separate, check_writable

    settings = _overrides(args)
    if args.out:
        out = Path(args.out)
        check_separate(out, [("images", args.images), ("masks", args.masks)], "--out file")
        if out.is_dir():
            raise DataError(f"--out {out} is a folder; give the plan file's path")
    from kunet.volumes import holds_volumes

    guesses = Guesses(args.strict)
    volumes = args.volumes or holds_volumes(args.images)
    data = load_folder(
        args.images, args.masks, num_classes=args.num_classes, nan_policy=args.nan_policy,
        guesses=guesses, normalization=None, volumes=volumes,
        stream="auto" if args.stream is None else args.stream, fingerprint=True,
    )  # fmt: skip
    plan = kplan.make_plan(
        kplan.fingerprint(data),
        time_budget=args.time_budget,
        backend=keras.backend.backend(),
        gpu=has_accelerator(),
    )
    plan["settings"].update(settings)
    plan["reasons"].update({k: "set by the user" for k in settings})
    replace = "model" in settings and "filters" not in settings
    plan = kplan.with_preset(plan, 3 if volumes else 2, replace_filters=replace)
    kplan.check_settings(plan["settings"], "plan")
    for line in guesses.lines():
        print_note(line)
    fp = plan["fingerprint"]
    if volumes:
        median = "x".join(f"{fp[k]['median']:g}" for k in ("depth", "height", "width"))
        what = f"{fp['images']} volume(s)"
        median += " (DxHxW)"
    else:
        median = f"{fp['height']['median']:g}x{fp['width']['median']:g}"
        what = f"{fp['images']} image(s)"
    print(
        f"{what}, {fp['channels']} channel(s), {fp['num_classes']} classes, median {median}; "
        f"class fractions {fp['class_fractions']}"
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
    from kunet.presets import names

    p.add_argument(
        "--model",
        default=None,
        metavar="PRESET",
        help="the architecture, a preset: " + ", ".join(names()) + " (default: the plain UNet "
        "with the plan's filters; a preset's own filters are used unless --filters is given)",
    )
    _add_plan_overrides(p)
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default=None,
        help="fp32 (default), or mixed precision: bf16 (mixed_bfloat16) or fp16 (mixed_float16, "
        "with loss scaling); variables, head, loss and metrics stay float32",
    )
    _add_stream(p)
    p.add_argument(
        "--workers",
        type=_number(int, "an integer >= 0", lambda v: v >= 0),
        default=None,
        metavar="N",
        help="threads preparing training batches ahead (default: 2 when streaming, none in memory)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--devices",
        type=_positive_int,
        default=None,
        metavar="N",
        help="train data-parallel on N devices (KERAS_BACKEND=jax or tensorflow; the GPUs, else "
        "the CPU split into N): the batch size is the global one, split evenly over them",
    )
    p.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="JAX, several processes training together: process 0's address (it listens "
        "there); give --num-processes and --process-id too, in every process",
    )
    p.add_argument(
        "--num-processes", type=_positive_int, default=None, metavar="N", help="processes in all"
    )
    p.add_argument(
        "--process-id",
        type=_number(int, "an integer >= 0", lambda v: v >= 0),
        default=None,
        metavar="I",
        help="this process's index, 0 .. N-1 (process 0 writes --out)",
    )
    _add_safety(p)
    p.set_defaults(func=_run_train)


def _run_train(args):
    from kunet.train import train

    train(
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
        volumes=args.volumes,
        model=args.model,
        precision=args.precision,
        stream="auto" if args.stream is None else args.stream,
        workers=args.workers,
        devices=args.devices,
        coordinator=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
    )
    return 0


def _add_predict(sub):
    p = sub.add_parser(
        "predict",
        help="write class-index masks and overlays for images",
        description="Predict every image (tiled when larger than a tile): <stem>.png holds class "
        "indices (palette PNG), <stem>_overlay.png shows them on the image. A 3D model reads "
        "volumes (NIfTI, .npy, TIFF stacks) and writes each mask in its input's format (NIfTI with "
        "the input's affine), the overlay showing one slice.",
    )
    _add_model(p)
    p.add_argument(
        "--images", required=True, help="an image (volume) file or a folder of images (volumes)"
    )
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
    from kunet.predict import predict

    predict(
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
    _add_model(p)
    p.add_argument("--images", required=True, help="folder of images (of volumes, for a 3D model)")
    _add_masks(p)
    _add_inference(p)
    _add_stream(p)
    p.add_argument("--json", action="store_true", help="print the scores as one JSON line last")
    _add_safety(p, writes=False)
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args):
    from kunet.predict import evaluate

    scores = evaluate(
        args.model,
        args.images,
        args.masks,
        tile_size=args.tile_size,
        tta=args.tta,
        nan_policy=args.nan_policy,
        strict=args.strict,
        stream="auto" if args.stream is None else args.stream,
    )
    print(f"{scores['images']} image(s), {scores['num_classes']} classes")
    print(f"{'class':>6} {'dice':>8} {'iou':>8}")
    for c in scores["dice"]:
        print(f"{c:>6} {scores['dice'][c]:8.4f} {scores['iou'][c]:8.4f}")
    print(f"{'fg mean':>6} {scores['mean_dice']:8.4f} {scores['mean_iou']:8.4f}")
    if args.json:
        print(json.dumps(scores), flush=True)
    return 0


def _add_export(sub):
    p = sub.add_parser(
        "export",
        help="export a .keras model to ONNX or a TensorFlow SavedModel",
        description="Write the model for a runtime without Keras: an ONNX file (onnxruntime, "
        "TensorRT, ...) or a TensorFlow SavedModel folder (TF Serving, TFLite converter), with "
        "dynamic batch and spatial sizes. Needs the export tools: pip install 'kunet[export]'.",
    )
    _add_model(p)
    p.add_argument(
        "--format", required=True, choices=("onnx", "saved_model"), help="the exported format"
    )
    p.add_argument("--out", required=True, help="the file (onnx) or folder (saved_model) to write")
    p.add_argument(
        "--verify",
        action="store_true",
        help="run the exported model once (onnxruntime / TensorFlow) on two input sizes and "
        "compare with the Keras model's predictions",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace --out if it exists (default: refuse)"
    )
    p.set_defaults(func=_run_export)


def _run_export(args):
    from kunet.export import export_file

    export_file(
        args.model, args.out, format=args.format, verify=args.verify, overwrite=args.overwrite
    )
    return 0


def _add_convert(sub):
    p = sub.add_parser(
        "convert",
        help="turn a PyTorch UNet checkpoint into a kunet .keras model",
        description="Read a PyTorch UNet state dict (the classic tutorial layout: downs/ups/"
        "bottleneck/final_conv, or milesial/Pytorch-UNet's: inc/down1..4/up1..4/outc), infer its "
        "filters and classes from the tensors, and write the same network as a kunet model.",
    )
    p.add_argument("--torch", required=True, help="a .pth/.pt file holding the state dict")
    p.add_argument("--out", required=True, help="the .keras file to write")
    p.add_argument(
        "--layout",
        choices=("auto", "tutorial", "milesial"),
        default="auto",
        help="the checkpoint's key layout (default: recognised from its keys)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace --out if it exists (default: refuse)"
    )
    p.set_defaults(func=_run_convert)


def _run_convert(args):
    from kunet.convert import convert_file

    convert_file(args.torch, args.out, layout=args.layout, overwrite=args.overwrite)
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
    _add_demo(sub)
    _add_plan(sub)
    _add_train(sub)
    _add_predict(sub)
    _add_evaluate(sub)
    _add_export(sub)
    _add_convert(sub)
    for command in sub.choices.values():  # read before Keras is imported (kunet._startup)
        command.add_argument(
            "--verbose",
            action="store_true",
            help="show the frameworks' start-up log lines (TensorFlow's C++ logging), which are "
            "otherwise kept out of the terminal",
        )
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parser.parse_args(argv)

    from kunet.callbacks import NonFiniteError
    from kunet.io import DataError

    try:
        return int(args.func(args) or 0)
    except (DataError, NonFiniteError) as e:  # bad input: 2; training diverged: 1
        print(f"kunet: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2 if isinstance(e, DataError) else 1
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
