"""This CPU's int8 peak: independent ``vpdpbusd`` streams on every thread, nothing else in the loop.

Each thread keeps ``ACCUMULATORS`` int32x16 accumulators (enough independent chains to hide the
instruction's latency) and updates each ``iters`` times from operands held in registers. One
``vpdpbusd`` is 64 multiply-adds, 128 integer ops.
"""
from __future__ import annotations

import os
import time

import numpy as np
import tvm
from tvm.script import tirx as T

ACCUMULATORS = 12
OPS_PER_INSTRUCTION = 128


def _peak_func(threads: int, iters: int) -> tvm.tirx.PrimFunc:
    @T.prim_func
    def peak(a: T.Buffer((64,), "int8"), b: T.Buffer((64,), "int8"), out: T.Buffer((threads, ACCUMULATORS, 16), "int32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for t in T.parallel(threads):
            acc = T.alloc_local((ACCUMULATORS,), "int32x16")
            for j in T.unroll(ACCUMULATORS):
                acc[j] = T.broadcast(T.int32(j), 16)
            for _ in range(iters):
                for j in T.unroll(ACCUMULATORS):
                    acc[j] = T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc[j],
                                                     a[T.ramp(0, 1, 64)], b[T.ramp(0, 1, 64)])
            for j in T.unroll(ACCUMULATORS):
                out[t, j, T.ramp(0, 1, 16)] = acc[j]

    return peak


def measure_vnni_peak(target: tvm.target.Target, iters: int = 2_000_000, repeat: int = 5) -> dict:
    """GOPS of ``vpdpbusd`` streams on every CPU this process may use (the best of ``repeat`` runs)."""
    threads = len(os.sched_getaffinity(0))
    module = tvm.compile(tvm.IRModule({"main": _peak_func(threads, iters)}), target=target).mod
    args = [tvm.runtime.tensor(np.ones(64, np.int8)), tvm.runtime.tensor(np.ones(64, np.int8)),
            tvm.runtime.tensor(np.zeros((threads, ACCUMULATORS, 16), np.int32))]
    module["main"](*args)  # warm-up (thread pool start)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        module["main"](*args)
        best = min(best, time.perf_counter() - t0)
    ops = OPS_PER_INSTRUCTION * ACCUMULATORS * iters * threads
    return {"threads": threads, "gops": ops / best / 1e9, "seconds": best}
