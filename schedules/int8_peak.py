"""This CPU's int8 peak for a dot-product family: independent streams of its instruction on every thread,
nothing else in the loop.

Each thread keeps ``ACCUMULATORS`` int32 vector accumulators (enough independent chains to hide the
instruction's latency) and updates each ``iters`` times from operands held in registers: one ``vpdpbusd``
(VNNI), or one ``vpmaddwd`` and the ``vpaddd`` that accumulates it (AVX-512 BW, AVX2; the accumulator is
also an operand of ``vpmaddwd``, or the compiler would hoist the loop-invariant product). The ops are the
instruction's multiply-adds x 2 (``Int8Dot.ops_per_instruction``).
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np
import tvm
from tvm.script import tirx as T

from .intrin import Int8Dot

ACCUMULATORS = 12


def _peak_func(dot: Int8Dot, threads: int, iters: int) -> tvm.tirx.PrimFunc:
    acc_type, width = f"int32x{dot.lanes}", dot.lanes * 4  # operand bytes
    operand, accumulates = dot.operand, dot.accumulates

    @T.prim_func
    def peak(a: T.Buffer((width,), "int8"), b: T.Buffer((width,), "int8"),
             out: T.Buffer((threads, ACCUMULATORS, dot.lanes), "int32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for t in T.parallel(threads):
            acc = T.alloc_local((ACCUMULATORS,), acc_type)
            for j in T.unroll(ACCUMULATORS):
                acc[j] = T.broadcast(T.int32(j), dot.lanes)
            for _ in range(iters):
                for j in T.unroll(ACCUMULATORS):
                    if accumulates:
                        acc[j] = T.call_llvm_pure_intrin(acc_type, dot.instruction, acc[j],
                                                         a[T.ramp(0, 1, width)], b[T.ramp(0, 1, width)])
                    else:
                        # the accumulator as one operand: products of loop invariants would be hoisted
                        acc[j] = acc[j] + T.call_llvm_pure_intrin(
                            acc_type, dot.instruction, T.reinterpret(acc[j], dtype=operand),
                            T.reinterpret(b[T.ramp(0, 1, width)], dtype=operand))
            for j in T.unroll(ACCUMULATORS):
                out[t, j, T.ramp(0, 1, dot.lanes)] = acc[j]

    return peak


def int8_peak_runner(dot: Int8Dot, target: tvm.target.Target, iters: int = 2_000_000) -> Callable[[int], dict]:
    """Compile the peak microbenchmark once; the returned function measures it: GOPS of ``dot``'s instruction
    streams on every CPU this process may use, the best of ``repeat`` runs of ``iters`` iterations."""
    threads = len(os.sched_getaffinity(0))
    module = tvm.compile(tvm.IRModule({"main": _peak_func(dot, threads, iters)}), target=target).mod
    width = dot.lanes * 4
    args = [tvm.runtime.tensor(np.ones(width, np.int8)), tvm.runtime.tensor(np.ones(width, np.int8)),
            tvm.runtime.tensor(np.zeros((threads, ACCUMULATORS, dot.lanes), np.int32))]
    module["main"](*args)  # warm-up (thread pool start)
    ops = dot.ops_per_instruction * ACCUMULATORS * iters * threads

    def measure(repeat: int) -> dict:
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            module["main"](*args)
            best = min(best, time.perf_counter() - t0)
        return {"threads": threads, "gops": ops / best / 1e9, "seconds": best, "instruction": dot.instruction}

    return measure


def measure_int8_peak(dot: Int8Dot, target: tvm.target.Target, iters: int = 2_000_000, repeat: int = 5) -> dict:
    """GOPS of ``dot``'s instruction streams on every CPU this process may use (the best of ``repeat`` runs)."""
    return int8_peak_runner(dot, target, iters)(repeat)
