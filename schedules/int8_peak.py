"""This CPU's int8 peak for a dot-product family: independent streams of its instruction on every thread,
nothing else in the loop.

Each thread keeps ``ACCUMULATORS`` int32 vector accumulators (enough independent chains to hide the
instruction's latency) and updates each ``iters`` times from operands held in registers: one ``vpdpbusd``
(VNNI), or one ``vpmaddwd`` and the ``vpaddd`` that accumulates it (AVX-512 BW, AVX2; the accumulator is
also an operand of ``vpmaddwd``, or the compiler would hoist the loop-invariant product). The ops are the
instruction's multiply-adds x 2 (``Int8Dot.ops_per_instruction``).

For AMX (``amx_tiles``) each thread configures the tiles and streams ``tdpbusd`` into four accumulator tiles from
four loaded operand tiles (a 2 x 2 block, as the kernel's): 16 x 16 x 64 multiply-adds each.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np
import tvm
from tvm.script import tirx as T

from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as Tb

from .intrin import Int8Dot
from .intrin.dot import AMX_TILE_BYTES
from .intrin.x86_amx import TILE_ROWS, configure_tiles, stride, tile_call, tile_id

ACCUMULATORS = 12
AMX_INSTRUCTION = "llvm.x86.tdpbusd"
AMX_BLOCK = 2  # accumulator tiles 2 x 2, operand tiles 2 + 2


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


def _amx_peak_func(threads: int, iters: int) -> tvm.tirx.PrimFunc:
    tiles = AMX_BLOCK * AMX_BLOCK
    with IRBuilder() as builder:
        with Tb.prim_func():
            Tb.func_name("main")
            a = Tb.arg("a", Tb.Buffer((TILE_ROWS, AMX_TILE_BYTES), "uint8"))
            out = Tb.arg("out", Tb.Buffer((threads, TILE_ROWS, TILE_ROWS), "int32"))
            Tb.func_attr({"global_symbol": "main", "tirx.noalias": True})
            with Tb.parallel(0, threads) as t:
                configure_tiles()
                for tile in range(tiles):
                    Tb.evaluate(tile_call("tilezero", tile_id(tile)))
                    Tb.evaluate(tile_call("tileloadd64", tile_id(tiles + tile), Tb.address_of(a[0, 0]),
                                          stride(AMX_TILE_BYTES)))
                with Tb.serial(0, iters):
                    for r in range(AMX_BLOCK):
                        for c in range(AMX_BLOCK):
                            Tb.evaluate(tile_call("tdpbusd", tile_id(r * AMX_BLOCK + c), tile_id(tiles + r),
                                                  tile_id(tiles + AMX_BLOCK + c)))
                Tb.evaluate(tile_call("tilestored64", tile_id(0), Tb.address_of(out[t, 0, 0]), stride(TILE_ROWS * 4)))
                Tb.evaluate(tile_call("tilerelease"))
    return builder.get()


def int8_peak_runner(dot: Int8Dot, target: tvm.target.Target, iters: int = 2_000_000) -> Callable[[int], dict]:
    """Compile the peak microbenchmark once; the returned function measures it: GOPS of ``dot``'s instruction
    streams on every CPU this process may use, the best of ``repeat`` runs of ``iters`` iterations (an AMX
    iteration is four ``tdpbusd``: ``iters`` / 64 of them)."""
    threads = len(os.sched_getaffinity(0))
    if dot.amx_tiles:
        iters = max(1, iters // 64)
        func, instruction = _amx_peak_func(threads, iters), AMX_INSTRUCTION
        args = [np.ones((TILE_ROWS, AMX_TILE_BYTES), np.uint8), np.zeros((threads, TILE_ROWS, TILE_ROWS), np.int32)]
        ops = 2 * TILE_ROWS * TILE_ROWS * AMX_TILE_BYTES * AMX_BLOCK * AMX_BLOCK * iters * threads
    else:
        width = dot.lanes * 4
        func, instruction = _peak_func(dot, threads, iters), dot.instruction
        args = [np.ones(width, np.int8), np.ones(width, np.int8),
                np.zeros((threads, ACCUMULATORS, dot.lanes), np.int32)]
        ops = dot.ops_per_instruction * ACCUMULATORS * iters * threads
    module = tvm.compile(tvm.IRModule({"main": func}), target=target).mod
    args = [tvm.runtime.tensor(x) for x in args]
    module["main"](*args)  # warm-up (thread pool start)

    def measure(repeat: int) -> dict:
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            module["main"](*args)
            best = min(best, time.perf_counter() - t0)
        return {"threads": threads, "gops": ops / best / 1e9, "seconds": best, "instruction": instruction}

    return measure


def measure_int8_peak(dot: Int8Dot, target: tvm.target.Target, iters: int = 2_000_000, repeat: int = 5) -> dict:
    """GOPS of ``dot``'s instruction streams on every CPU this process may use (the best of ``repeat`` runs)."""
    return int8_peak_runner(dot, target, iters)(repeat)
