"""``int8mt bench kernels --target cuda-*``: our int8 tensor-core linear kernels against cuBLASLt INT8
(``torch._int_mm``) and cuBLAS FP16 on this machine's GPU, at every linear-layer shape of the reference and the
Transformer-base-shaped model and at 4096^3. Each kernel is built here as a bundle's (the tuned table's tiles, else
the default; up to 32 rows its few-rows kernel where it has one), checked against NumPy (exact int32) and timed
with TVM's ``time_evaluator`` (best of 3 x 20);
PyTorch's with CUDA events (mean of 50 after a warm-up).

The same measurement runs on a GPU machine that cannot compile (``scripts/cuda_gpu_check.py``, docs/cuda.md)."""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from int8mt.errors import UserError
from int8mt.targets import TargetPreset

TOKENS = 20  # tokens per sentence
SQUARE = 4096  # the 4096^3 matmul GPU libraries are usually quoted at
CUBLASLT_MIN_ROWS = 17  # torch._int_mm needs more than 16 rows


def torch_ms(fn: Callable[[], object], repeat: int = 50) -> float:
    """Mean milliseconds of ``fn`` (a PyTorch CUDA call) over ``repeat`` runs after a warm-up, by CUDA events."""
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat


def time_dense(tvm: Any, vm: Any, x: np.ndarray, w: np.ndarray) -> dict:
    """Our kernel ``vm`` (``x @ w.T`` in int32) against NumPy, and its time beside cuBLASLt INT8's and cuBLAS
    FP16's on the same operands."""
    import torch

    from int8mt.schedules.cuda_tiles import exact_product

    dev = tvm.cuda(0)
    xt, wt = tvm.runtime.tensor(x, dev), tvm.runtime.tensor(w, dev)
    row = {"exact": bool(np.array_equal(vm["main"](xt, wt).numpy(), exact_product(x, w.T)))}
    row["int8mt_ms"] = min(vm.time_evaluator("main", dev, number=20, repeat=3)(xt, wt).results) * 1e3
    tx, tw = torch.from_numpy(x).cuda(), torch.from_numpy(w).cuda()
    row["cublaslt_int8_ms"] = (torch_ms(lambda: torch._int_mm(tx, tw.t())) if x.shape[0] >= CUBLASLT_MIN_ROWS
                               else None)
    hx, hw = tx.half(), tw.half()
    row["cublas_fp16_ms"] = torch_ms(lambda: hx @ hw.t())
    row["int8mt_tops"] = 2 * x.size * w.shape[0] / row["int8mt_ms"] / 1e9
    return row


def bench_cuda_kernels(preset: TargetPreset, database_dir: Path | None, sentences: tuple[int, ...] = (1, 32)) -> dict:
    """The benchmark rows (see the module docstring) on this machine's GPU."""
    from int8mt.runtime.bundle import import_tvm_runtime
    from int8mt.schedules.cuda_int8_matmul import FEW_ROWS, CUDAInt8Matmul
    from int8mt.schedules.cuda_tiles import (build_kernel, dense_module, load_kernel, load_tiles, measuring_gpu,
                                             random_int8)
    from int8mt.schedules.database import BENCH_MODELS, linear_shapes

    device = measuring_gpu(preset, f"benchmarking {preset.name} kernels",
                           "Where the GPU machine cannot compile: `python scripts/cuda_gpu_check.py prepare DIR` "
                           "here, then `run DIR --out R` there (docs/cuda.md)")
    tvm = import_tvm_runtime()
    try:
        import torch  # noqa: F401
    except ImportError:
        raise UserError("the CUDA kernel benchmark compares with PyTorch's cuBLAS calls; install torch") from None
    table, few_rows = (load_tiles(database_dir), load_tiles(database_dir, few_rows=True)) \
        if database_dir is not None else ({}, {})
    rule = CUDAInt8Matmul(tuned=table, tuned_few_rows=few_rows)  # as a bundle's kernels, few-rows kernel included
    cases = [(model, n, k, s * TOKENS) for model, dims in BENCH_MODELS.items() for n, k in linear_shapes(*dims)
             for s in sentences] + [("square", SQUARE, SQUARE, SQUARE)]
    rng, rows = np.random.default_rng(0), []
    with tempfile.TemporaryDirectory(prefix="int8mt-cuda-bench-") as work:
        for index, (model, n, k, m) in enumerate(cases):
            tile, few = rule.linear_tiles(k, n, preset.target["arch"])
            runs, tuned = (few, (k, n) in few_rows) if few is not None and m <= FEW_ROWS else (tile, (k, n) in table)
            name = f"dense{index}"
            digest = build_kernel(dense_module(k, n), preset, Path(work), name, rule)
            vm = load_kernel(tvm, Path(work), name, digest)
            row = {"model": model, "n": n, "k": k, "rows": m, "tile": runs.label, "tuned": tuned,
                   **time_dense(tvm, vm, random_int8(rng, (m, k)), random_int8(rng, (n, k)))}
            if not row["exact"]:
                raise RuntimeError(f"the int8 kernel for {n} x {k} at {m} rows differs from NumPy")
            rows.append(row)
    return {"gpu": device.device_name, "preset": preset.name, "rows": rows}


def format_cuda_kernel_table(result: dict) -> str:
    lines = [f"int8 tensor-core kernels on {result['gpu']} ({result['preset']}), every result exact", "",
             "| model | n x k | rows | tile | int8mt µs | int8mt TOPS | cuBLASLt INT8 µs | cuBLAS FP16 µs | "
             "int8mt / cuBLASLt |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lt = r["cublaslt_int8_ms"]
        theirs, ratio = (f"{1e3 * lt:.1f}", f"{lt / r['int8mt_ms']:.2f}x") if lt else ("-", "-")
        tile = r["tile"] + ("" if r["tuned"] else " (default)")
        lines.append(f"| {r['model']} | {r['n']} x {r['k']} | {r['rows']} | {tile} | {1e3 * r['int8mt_ms']:.1f} | "
                     f"{r['int8mt_tops']:.1f} | {theirs} | {1e3 * r['cublas_fp16_ms']:.1f} | {ratio} |")
    return "\n".join(lines)
