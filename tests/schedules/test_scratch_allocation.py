"""Our CPU kernels take their scratch memory once per call, not once per row (or per pair of a row and a head).

TVMScript's ``x = expr`` and ``x: T.float32 = expr`` declare one-element buffers, and a buffer used within one
iteration of a parallel loop is allocated there: on a CPU, from TVM's workspace pool at every iteration. A decoder
step of the reference model with run-time ranges made 3600 such allocations at batch 32 (~6 % of its time);
``x: T.let = expr`` binds a value instead, and scratch of a size known only at run time is declared once for the
call. The generated LLVM IR is read for ``__TVMBackendAllocWorkspace`` calls inside the parallel loops' bodies.
"""
import re

import pytest
import tvm

from int8mt.quant.ops import EPS
from int8mt.schedules.int8_dense import DenseEpilogue, DenseTiles, scheduled_int8_dense
from int8mt.schedules.intrin import int8_dot
from int8mt.schedules.layer_norm_rows import RowQuantize, layer_norm_rows_kernel
from int8mt.schedules.one_query_attention import (context_kernel, direct_context_kernel, quantized_context_kernel,
                                                  quantized_scores_kernel, scores_kernel)
from int8mt.schedules.quantize_rows import quantize_rows_kernel
from int8mt.targets import get_preset

VNNI = get_preset("x86-vnni")
RANGE = (127.0, EPS)
INT32 = (0, 32)  # the workspace call's dtype code and bits of an int32 buffer
BATCH, POSITIONS = tvm.tirx.Var("b", "int64"), tvm.tirx.Var("t", "int64")
# epilogues as FuseAttentionEpilogue builds them: the scores dequantized into [b, 4, 1, t], the context
# requantized into rows [b, 4 * 64]
DEQUANTIZED = DenseEpilogue((BATCH, 4, 1, POSITIONS), "float32", (), (BATCH, POSITIONS),
                            lambda c, i, j, _: ([i // 4, i % 4, 0, j], tvm.tirx.Cast("float32", c) * 0.01))
REQUANTIZED = DenseEpilogue((BATCH, 256), "int8", (), (BATCH,), lambda c, i, j, _: (
    [i // 4, i % 4 * 64 + j], tvm.tirx.Cast("int8", tvm.tirx.max(tvm.tirx.min(c >> 4, 127), -127))))


def _allocations_per_iteration(func: tvm.tirx.PrimFunc) -> list[tuple[int, int, int]]:
    """``(bytes, dtype code, bits)`` of every workspace allocation inside the parallel loops' bodies of ``func``
    compiled for x86-vnni (LLVM IR only: no VNNI needed to run)."""
    lib = tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target(VNNI.target))
    source = lib.mod.inspect_source("ll")
    found = []
    for start in (m.start() for m in re.finditer(r"define [^\n]*@__tvm_parallel_lambda", source)):
        body = source[start:source.index("\n}\n", start)]
        pointers = re.findall(r"(%\w+) = load ptr, ptr @__TVMBackendAllocWorkspace", body)
        for pointer in pointers:
            call = re.search(rf"call ptr {pointer}\(i32 1, i32 %\w+, i64 (\d+|%\w+), i32 (\d+), i32 (\d+)\)", body)
            size = int(call.group(1)) if call.group(1).isdigit() else -1
            found.append((size, int(call.group(2)), int(call.group(3))))
    return found


@pytest.mark.parametrize("make", [
    lambda: quantize_rows_kernel(3, 256, *RANGE),
    lambda: quantize_rows_kernel(4, None, *RANGE),
    lambda: layer_norm_rows_kernel(3, 256, 1e-5, 16, RowQuantize(*RANGE)),
    lambda: quantized_scores_kernel(4, 64, *RANGE, 16),
    lambda: quantized_scores_kernel(4, 64, *RANGE, 16, RANGE),
    lambda: quantized_scores_kernel(None, 64, *RANGE, 16),
    lambda: quantized_context_kernel(4, 64, *RANGE),
    lambda: quantized_context_kernel(4, 64, *RANGE, RANGE),
    lambda: quantized_context_kernel(4, 64, *RANGE, RANGE, RANGE),
    lambda: quantized_context_kernel(None, 64, *RANGE),
    lambda: quantized_context_kernel(None, 64, *RANGE, None, RANGE),
    lambda: scores_kernel(4, 64, "int8", 16, DEQUANTIZED),
    lambda: context_kernel(4, 64, "int8", REQUANTIZED),
    lambda: direct_context_kernel(64, "int8", REQUANTIZED),
], ids=["quantize-rows", "quantize-rows-any-length", "layer-norm-quantize-rows", "gathered-scores",
        "gathered-scores-quantizing-new", "direct-scores", "gathered-context", "gathered-context-quantizing-new",
        "gathered-context-quantizing-rows", "direct-context", "direct-context-quantizing-rows",
        "gathered-scores-dequantized", "gathered-context-requantized", "direct-context-requantized"])
def test_row_kernels_allocate_nothing_per_row(make):
    assert _allocations_per_iteration(make()) == []


def test_dense_allocates_per_strip_only_its_accumulator_tile():
    """The int8 dense kernel's only allocation per column strip is its int32 accumulator tile (the tensorized
    product's operand, of local scope); the VNNI intrinsic's broadcast activations are a value, not a buffer."""
    kernel = scheduled_int8_dense(512, 256, DenseTiles(rows=4, cols=4, depth=4), int8_dot(VNNI.int8_dot))
    found = _allocations_per_iteration(kernel)
    assert found and all(a[1:] == INT32 for a in found), found
