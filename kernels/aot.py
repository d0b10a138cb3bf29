"""Ahead-of-time compile every kernel of the fused DoubleConv and report its resource use.

    python -m kunet.kernels.aot [--json] [--jobs N] [--targets 80,90] [--dtypes fp16,bf16,fp32]

No GPU is needed: each kernel is compiled with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", 80|90, 32))`` for every launch configuration the dispatcher can pick
(:data:`kunet.kernels.double_conv.CONFIGS` and the constexpr variants used by
:mod:`kunet.kernels.autograd`), for fp16, bf16 and fp32 activations.  Registers and spill (stack)
bytes come from ``cuobjdump --dump-resource-usage`` on the cubin (shipped in Triton's wheel), shared
memory from Triton's metadata.  Exit status 1 if anything fails to compile or spills.

Pointer arguments are compiled with the 16-byte divisibility hint the JIT adds at launch for torch
allocations, so the report describes the code that runs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile
import time

DTYPES = ("fp16", "bf16", "fp32")
TARGETS = (80, 90)

# (kernel name, variant, where the autograd uses it, constexpr flags)
CONV_VARIANTS = {
    "train1": dict(PRO_BN_RELU=False, HAS_BIAS=False, RELU_OUT=False, STATS=True),  # conv1 fwd
    "train2": dict(PRO_BN_RELU=True, HAS_BIAS=False, RELU_OUT=False, STATS=True),  # conv2 fwd
    "infer": dict(PRO_BN_RELU=False, HAS_BIAS=True, RELU_OUT=True, STATS=False),  # BN folded
    "dgrad": dict(PRO_BN_RELU=False, HAS_BIAS=False, RELU_OUT=False, STATS=False),  # backward
}
SPECIALIZED_CONV = ("train1[N=1,C_IN=1]", "infer[N=1,C_IN=1]", "dgrad[N=1,C_OUT=1]")
WGRAD_VARIANTS = {"wgrad1": dict(PRO_BN_RELU=False), "wgrad2": dict(PRO_BN_RELU=True)}


def _jobs(dtypes=DTYPES, targets=TARGETS):
    """Every (kernel, variant, dtype, target) the fused path can launch."""
    jobs = []
    for cc in targets:
        for dt in dtypes:
            jobs += [("conv3x3_kernel", v, dt, cc) for v in CONV_VARIANTS]
            jobs += [("conv3x3_wgrad_kernel", v, dt, cc) for v in WGRAD_VARIANTS]
            jobs += [(k, "-", dt, cc) for k in ("bn_relu_apply_kernel", "bn_relu_bwd_reduce_kernel",
                                                 "bn_relu_bwd_dy_kernel")]  # fmt: skip
        # statistics are fp32 whatever the activations' dtype
        jobs.append(("bn_finalize_kernel", "-", "fp32", cc))
        # Triton's JIT turns integer arguments equal to 1 into constants: batch 1, grayscale input
        # (Cin 1) and its input gradient (a dgrad with Cout 1) compile to different code
        dt = "fp16" if "fp16" in dtypes else dtypes[0]
        jobs += [("conv3x3_kernel", v, dt, cc) for v in SPECIALIZED_CONV]
        jobs += [("conv3x3_wgrad_kernel", "wgrad1[C_IN=1]", dt, cc)]
    return jobs


def _spec(kernel, variant, dt):
    """(signature, constexprs, options, config string) for one job."""
    from kunet.kernels import double_conv as K

    p, f = f"*{dt}", "*fp32"
    ones = {}  # "train1[N=1,C_IN=1]": integer arguments specialized to the constant 1
    if "[" in variant:
        variant, spec = variant.rstrip("]").split("[")
        ones = {name: 1 for name in (item.split("=")[0] for item in spec.split(","))}
    if kernel == "conv3x3_kernel":
        cfg = K.CONFIGS["conv3x3"]
        sig = dict(x_ptr=p, w_ptr=p, y_ptr=p, in_scale_ptr=f, in_shift_ptr=f, bias_ptr=f,
                   part_mean_ptr=f, part_m2_ptr=f, N="i32", H="i32", W="i32", C_IN="i32",
                   C_OUT="i32")  # fmt: skip
        const = dict(BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], IEEE=False, **CONV_VARIANTS[variant])
    elif kernel == "conv3x3_wgrad_kernel":
        cfg = K.CONFIGS["wgrad"]
        sig = dict(x_ptr=p, dy_ptr=p, dw_part_ptr=f, in_scale_ptr=f, in_shift_ptr=f, N="i32",
                   H="i32", W="i32", C_IN="i32", C_OUT="i32", ROWS_PER_SPLIT="i32")  # fmt: skip
        const = dict(BM=cfg["BM"], BCI=cfg["BCI"], BCO=cfg["BCO"], IEEE=False,
                     **WGRAD_VARIANTS[variant])  # fmt: skip
    elif kernel == "bn_finalize_kernel":
        cfg = K.CONFIGS["finalize"]
        sig = dict(part_mean_ptr=f, part_m2_ptr=f, gamma_ptr=f, beta_ptr=f, mean_ptr=f, var_ptr=f,
                   scale_ptr=f, shift_ptr=f, T="i32", M="i32", C="i32", eps="fp32")  # fmt: skip
        const = dict(TILE_M=K.CONFIGS["conv3x3"]["BM"], BT=cfg["BT"], BC=cfg["BC"])
    else:
        cfg = K.CONFIGS["elementwise"]
        ptrs = {
            "bn_relu_apply_kernel": dict(y_ptr=p, out_ptr=p, scale_ptr=f, shift_ptr=f),
            "bn_relu_bwd_reduce_kernel": dict(
                g_ptr=p,
                y_ptr=p,
                scale_ptr=f,
                shift_ptr=f,
                mean_ptr=f,
                rstd_ptr=f,
                part_da_ptr=f,
                part_dax_ptr=f,
            ),  # fmt: skip
            "bn_relu_bwd_dy_kernel": dict(
                g_ptr=p,
                y_ptr=p,
                dy_ptr=p,
                scale_ptr=f,
                shift_ptr=f,
                mean_ptr=f,
                rstd_ptr=f,
                k1_ptr=f,
                k2_ptr=f,
                k3_ptr=f,
            ),
        }[kernel]
        sig = dict(**ptrs, M="i32", C="i32")
        const = dict(BM=cfg["BM"], BC=cfg["BC"])
    const.update(ones)
    for name in const:
        sig[name] = "constexpr"
    options = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    shown = {k: v for k, v in const.items() if k.startswith("B") or k == "TILE_M"}
    config = "x".join(str(v) for v in shown.values()) + f" w{cfg['num_warps']}s{cfg['num_stages']}"
    return sig, const, options, config


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_one(job):
    """Compile one job; returns a result dict (never raises)."""
    kernel, variant, dt, cc = job
    row = dict(kernel=kernel, variant=variant, dtype=dt, target=f"sm_{cc}", config="",
               registers=None, spill_bytes=None, shared_bytes=None, seconds=None, error=None)  # fmt: skip
    t0 = time.perf_counter()
    try:
        import triton
        from kunet.kernels import double_conv as K
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        fn = getattr(K, kernel)
        sig, const, options, row["config"] = _spec(kernel, variant, dt)
        names = list(sig)
        attrs = {
            (names.index(n),): [["tt.divisibility", 16]] for n, s in sig.items() if s[0] == "*"
        }
        src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
        row["shared_bytes"] = int(k.metadata.shared)
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as fh:
            fh.write(k.asm["cubin"])
            path = fh.name
        try:
            usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", path],
                                   capture_output=True, text=True, check=True).stdout  # fmt: skip
        finally:
            os.unlink(path)
        reg = re.search(r"REG:(\d+)", usage)
        stack = re.search(r"STACK:(\d+)", usage)
        if reg is None or stack is None:
            raise RuntimeError(f"cannot parse cuobjdump output: {usage!r}")
        row["registers"], row["spill_bytes"] = int(reg.group(1)), int(stack.group(1))
        if row["spill_bytes"] > 0:
            row["error"] = f"spills {row['spill_bytes']} bytes of stack"
    except Exception as exc:  # report every failure, keep compiling the others
        row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _table(rows) -> str:
    head = (
        "kernel",
        "variant",
        "target",
        "dtype",
        "config",
        "regs",
        "spill",
        "smem",
        "s",
        "status",
    )
    lines = [head]
    for r in rows:
        lines.append((r["kernel"], r["variant"], r["target"], r["dtype"], r["config"],
                      str(r["registers"]), str(r["spill_bytes"]), str(r["shared_bytes"]),
                      str(r["seconds"]), "OK" if r["error"] is None else r["error"]))  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    ]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def run(dtypes=DTYPES, targets=TARGETS, jobs=2):
    """Compile everything (a process pool of ``jobs``); returns the result rows, in job order."""
    todo = _jobs(dtypes, targets)
    # Always in spawned workers: Triton's LLVM must not share a process with TensorFlow's (they
    # abort on load), and this process may have Keras on its default TensorFlow backend.  The
    # workers inherit this environment: torch backend, no interpreter.
    os.environ["KERAS_BACKEND"] = "torch"
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault(
        "TRITON_DEFAULT_FP_FUSION", "1"
    )  # Triton 3.9's default, minus its warning
    ctx = __import__("multiprocessing").get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=ctx) as pool:
        return list(pool.map(compile_one, todo))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kunet.kernels.aot", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--json", action="store_true", help="print the rows as JSON instead of a table"
    )
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    rows = run(
        tuple(args.dtypes.split(",")), tuple(int(t) for t in args.targets.split(",")), args.jobs
    )
    failed = [r for r in rows if r["error"] is not None]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(_table(rows))
        print(
            "\nconfig: conv3x3 BMxBNxBK, wgrad BMxBCIxBCO, finalize TILE_MxBTxBC, elementwise BMxBC;"
            " wN: warps, sN: pipeline stages.  regs: registers/thread, spill: stack bytes (cuobjdump),"
            " smem: shared memory bytes"
        )
        print(f"\n{len(rows)} kernels compiled in {time.perf_counter() - t0:.0f} s, "
              f"{len(failed)} failed or spilled")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
