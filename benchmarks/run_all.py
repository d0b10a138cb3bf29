"""Run benchmarks/throughput.py under every Keras backend and write the README's table and chart.

    python benchmarks/run_all.py [--rounds 5] [--steps 12] [--out benchmarks]

Each backend runs in its own process (``KERAS_BACKEND=...``), each against the same PyTorch reference
UNet, alternating rounds within that process. Writes ``OUT/results.md`` (Markdown table),
``OUT/results.json`` and ``OUT/throughput.png`` (bar chart; needs matplotlib). Takes about 4-5 minutes
on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BACKENDS = ("tensorflow", "jax", "torch")


def _run(backend, args):
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    cmd = [sys.executable, str(HERE / "throughput.py"), "--json", "--rounds", str(args.rounds),
           "--steps", str(args.steps), "--size", str(args.size), "--batch", str(args.batch)]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{backend}: throughput.py failed\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cpu():
    """The CPU's model and widest vector extension: the ratios depend on both (e.g. TensorFlow turns
    its oneDNN kernels on by itself only on CPUs with AVX512_VNNI/BF16 or AMX)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    isa = next(
        (name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in flags), ""
    )
    return f"{model}, {isa}" if isa else model


def _table(results, args):
    head = (
        f"UNet filters {results[0]['filters']}, {args.size}x{args.size}x3, batch {args.batch}, "
        f"Adam + BCE; medians of {args.rounds} alternating rounds; {os.cpu_count()} CPU cores "
        f"({_cpu()}); {time.strftime('%Y-%m-%d')}\n\n"
    )
    lines = [
        "| backend | jit_compile | train img/s | reference | ratio | infer img/s | reference "
        "| ratio | peak RSS MB (ref) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['backend']} | {r['jit_compile']} | {r['kunet_train_img_s']:.1f} | "
            f"{r['ref_train_img_s']:.1f} | **{r['train_ratio']:.2f}** | "
            f"{r['kunet_infer_img_s']:.1f} | {r['ref_infer_img_s']:.1f} | "
            f"**{r['infer_ratio']:.2f}** | {r['kunet_peak_rss_mb']:.0f} ({r['ref_peak_rss_mb']:.0f}) |"
        )
    return head + "\n".join(lines) + "\n"


def _chart(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart")
        return
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    names = [r["backend"] for r in results] + ["PyTorch ref."]
    for ax, key, title in ((axes[0], "train", "training"), (axes[1], "infer", "inference")):
        ref = sorted(r[f"ref_{key}_img_s"] for r in results)[len(results) // 2]
        values = [r[f"kunet_{key}_img_s"] for r in results] + [ref]
        ax.bar(names, values, color=["#4c72b0"] * len(results) + ["#999999"])
        ax.set_title(f"{title} (img/s, higher is better)")
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    start = time.time()
    results = []
    for backend in BACKENDS:
        print(f"running {backend} ...", flush=True)
        results.append(_run(backend, args))
    args.out.mkdir(parents=True, exist_ok=True)
    table = _table(results, args)
    for name, text in (("results.md", table), ("results.json", json.dumps(results, indent=1))):
        tmp = args.out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, args.out / name)
    _chart(results, args.out / "throughput.png")
    print(table)
    print(f"all backends in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
