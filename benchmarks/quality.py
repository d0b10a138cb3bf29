"""Held-out Dice of ``kunet train`` defaults vs the plain PyTorch reference, at the same time budget.

For each dataset of ``quality_data.py`` and each seed: the reference (``reference_train.py``: its
usual recipe, trained for ``--budget`` seconds) and ``kunet train --time-budget BUDGET --seed S``
on each backend (defaults otherwise), then ``kunet evaluate`` of the kept model on the test tiles.
Both scores are Dice per class over all test pixels, mean over the foreground classes. Runs go one
at a time (each has the machine to itself), in subprocesses; results are appended to
``OUT/results.json`` as they come, so an interrupted run continues where it stopped.

    python benchmarks/quality.py                       # everything: ~4 datasets x 4 runs x 2 seeds
    python benchmarks/quality.py --datasets nuclei --backends torch --seeds 0 --budget 60

Writes ``OUT/results.json`` and ``OUT/results.md`` (the table in the README).
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


def kunet(data, budget, seed, backend, runs, extra=()):
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    run = runs / f"{data.name}-{backend}-s{seed}"
    cli = [sys.executable, "-m", "kunet.cli"]
    _, wall = _run([*cli, "train", "--images", str(data / "train" / "images"), "--masks",
                    str(data / "train" / "masks"), "--out", str(run), "--time-budget", str(budget),
                    "--seed", str(seed), "--quiet", "--overwrite", *extra], env=env)  # fmt: skip
    out, eval_wall = _run([*cli, "evaluate", "--model", str(run / "best.keras"), "--images",
                           str(data / "test" / "images"), "--masks", str(data / "test" / "masks"),
                           "--json"], env=env)  # fmt: skip
    scores = json.loads(out.strip().splitlines()[-1])
    state = json.loads((run / "state.json").read_text())
    return {"dice": scores["mean_dice"], "wall_s": round(wall, 1), "eval_s": round(eval_wall, 1),
            "epochs": state["epoch"], "best_epoch": state.get("best_epoch")}  # fmt: skip


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
    text = table(wanted, args.datasets, args.backends, args.budget)
    (args.out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
