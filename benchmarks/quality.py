"""Held-out Dice of ``kunet train`` defaults vs the plain PyTorch reference, at the same time budget.

For each dataset of ``quality_data.py`` and each seed: the reference (``reference_train.py``: its
usual recipe, trained for ``--budget`` seconds) and ``kunet train --time-budget BUDGET --seed S``
on each backend (defaults otherwise), then ``kunet evaluate`` of the kept model on the test tiles.
Both scores are Dice per class over all test pixels, mean over the foreground classes. Runs go one
at a time (each has the machine to itself), in subprocesses; results are appended to
``OUT/results.json`` as they come, so an interrupted run continues where it stopped.

    python benchmarks/quality.py                       # everything: ~4 datasets x 4 runs x 2 seeds
    python benchmarks/quality.py --datasets nuclei --backends torch --seeds 0 --budget 60

Writes ``OUT/results.json`` and ``OUT/results.md`` (the tables in the README): the Dice of each, and
what flip TTA was worth (each kept model scored without and with it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import quality_data  # noqa: E402

BACKENDS = ("tensorflow", "jax", "torch")


def _run(argv, env=None, timeout=3600):
    start = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[:4]}... failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout, time.monotonic() - start


def reference(data, budget, seed):
    out, wall = _run([sys.executable, str(HERE / "reference_train.py"), "--train",
                      str(data / "train"), "--test", str(data / "test"), "--budget", str(budget),
                      "--seed", str(seed)])  # fmt: skip
    result = json.loads(out.strip().splitlines()[-1])
    return {"dice": result["dice"], "wall_s": round(wall, 1), "steps": result["steps"]}


def _env(backend):
    return {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}


def _evaluate(data, run, backend, *flags):
    out, wall = _run([sys.executable, "-m", "kunet.cli", "evaluate", "--model",
                      str(run / "best.keras"), "--images", str(data / "test" / "images"),
                      "--masks", str(data / "test" / "masks"), "--json", *flags],
                     env=_env(backend))  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])["mean_dice"], wall


def kunet(data, budget, seed, backend, runs, extra=()):
    run = runs / f"{data.name}-{backend}-s{seed}"
    _, wall = _run([sys.executable, "-m", "kunet.cli", "train", "--images",
                    str(data / "train" / "images"), "--masks", str(data / "train" / "masks"),
                    "--out", str(run), "--time-budget", str(budget), "--seed", str(seed),
                    "--quiet", "--overwrite", *extra], env=_env(backend))  # fmt: skip
    dice, eval_wall = _evaluate(data, run, backend)
    state = json.loads((run / "state.json").read_text())
    plan = json.loads((run / "plan.json").read_text())
    return {"dice": dice, "wall_s": round(wall, 1), "eval_s": round(eval_wall, 1),
            "epochs": state["epoch"], "best_epoch": state.get("best_epoch"),
            "tta": plan["settings"]["tta"], **tta_scores(data, run, backend)}  # fmt: skip


def tta_scores(data, run, backend):
    """The kept model's test Dice without and with flip TTA (what the plan's choice was worth)."""
    return {"dice_no_tta": _evaluate(data, run, backend, "--no-tta")[0],
            "dice_tta": _evaluate(data, run, backend, "--tta")[0]}  # fmt: skip


def tta_table(results, datasets, backends):
    """Median test Dice of the kept models without / with flip TTA, per dataset and backend."""
    lines = ["| dataset | " + " | ".join(f"{b}: no TTA / TTA" for b in backends) + " |",
             "|---|" + "---|" * len(backends)]  # fmt: skip
    for name in datasets:
        cells = []
        for backend in backends:
            rows = [
                r for r in results if tuple(r["key"][:2]) == (name, backend) and "dice_tta" in r
            ]
            if not rows:
                cells.append("-")
                continue
            off = statistics.median(r["dice_no_tta"] for r in rows)
            on = statistics.median(r["dice_tta"] for r in rows)
            cells.append(f"{off:.3f} / {on:.3f} ({on - off:+.3f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table(results, datasets, backends, budget):
    def median(key):
        values = [r["dice"] for r in results if tuple(r["key"][:2]) == key]
        return statistics.median(values) if values else None

    lines = [
        f"Held-out foreground Dice, {budget:g} s training budget, median of "
        f"{len({r['key'][2] for r in results})} seed(s); {platform.processor() or platform.machine()}"
        f", {os.cpu_count()} CPUs",
        "",
        "| dataset | reference (PyTorch) | " + " | ".join(f"kunet {b}" for b in backends) + " |",
        "|---|---|" + "---|" * len(backends),
    ]
    for name in datasets:
        ref = median((name, "reference"))
        cells = [f"{ref:.3f}" if ref is not None else "-"]
        for backend in backends:
            value = median((name, backend))
            if value is None:
                cells.append("-")
            else:
                diff = "" if ref is None else f" ({value - ref:+.3f})"
                cells.append(f"**{value:.3f}**{diff}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=HERE / "quality" / "data")
    parser.add_argument("--out", type=Path, default=HERE / "quality")
    parser.add_argument("--datasets", nargs="+", default=list(quality_data.NAMES))
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--budget", type=float, default=180.0)
    parser.add_argument("--fresh", action="store_true", help="ignore earlier results")
    parser.add_argument("--kunet-args", default="", help="extra kunet train arguments")
    args = parser.parse_args(argv)
    paths = quality_data.build(args.data, args.datasets)
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = (
        [] if args.fresh or not results_path.exists() else json.loads(results_path.read_text())
    )
    done = {tuple(r["key"]) for r in results}
    for seed in args.seeds:
        for name in args.datasets:
            for who in ("reference", *args.backends):
                key = (name, who, seed, args.budget, "" if who == "reference" else args.kunet_args)
                if key in done:
                    continue
                if who == "reference":
                    result = reference(paths[name], args.budget, seed)
                else:
                    result = kunet(paths[name], args.budget, seed, who, args.out / "runs",
                                   args.kunet_args.split())  # fmt: skip
                results.append({"key": list(key), **result})
                results_path.write_text(json.dumps(results, indent=1) + "\n")
                print(f"{name:10s} {who:10s} seed {seed}: Dice {result['dice']:.4f} "
                      f"({result['wall_s']:.0f} s)", flush=True)  # fmt: skip
    wanted = [
        r
        for r in results
        if r["key"][3] == args.budget
        and r["key"][4] in ("", args.kunet_args)
        and (r["key"][1] == "reference" or r["key"][4] == args.kunet_args)
    ]
    for r in wanted:  # runs recorded before the TTA columns existed: score their kept models
        run = args.out / "runs" / f"{r['key'][0]}-{r['key'][1]}-s{r['key'][2]}"
        if r["key"][1] != "reference" and "dice_tta" not in r and (run / "best.keras").is_file():
            r.update(tta_scores(paths[r["key"][0]], run, r["key"][1]))
            results_path.write_text(json.dumps(results, indent=1) + "\n")
    text = table(wanted, args.datasets, args.backends, args.budget)
    text += "\nFlip TTA, test Dice of the same kept models without / with it (median):\n\n"
    text += tta_table(wanted, args.datasets, args.backends)
    (args.out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
