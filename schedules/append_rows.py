"""A decoder step's new keys and values written into the self-attention cache's rows, in place, by one kernel.

The cache (:mod:`int8mt.runtime.cache`) is ``[layers, 2, rows, heads, width]``; a step computes each layer's new
key and value as ``[count, heads, 1, width]``, and this kernel, called at the end of the ``decode_step`` entry
point (:func:`int8mt.compiler.frontend.appending_step`), writes every plane. On a GPU, writing them with the
runtime's copies took a view of each destination and a copy per plane (18-36 calls per step through Python); a
separate entry point for this kernel cost a call from Python and the step's 12 outputs (about 5 µs of a 125 µs
step at batch 1 on the CPU). With run-time ranges on GPUs, :func:`append_quantized_rows_kernel` appends the float
rows, quantizing them itself (:class:`~int8mt.compiler.passes.AppendQuantizedRows`).
"""
from __future__ import annotations

import tvm
from tvm import tirx

from .kernel_attrs import KERNEL_ATTR
from .layer_norm_rows import RowQuantize

APPEND_ROWS = "append_rows"  # (KERNEL_ATTR)
APPEND_QUANTIZED_ROWS = "append_quantized_rows"  # (KERNEL_ATTR) a GPU row kernel: CUDARows schedules it


def append_rows_kernel(planes: int, heads: int, width: int, dtype: str) -> tirx.PrimFunc:
    """``cache[p // 2, p % 2, used + i] = new_p[i, :, 0]`` for the ``planes`` new tensors ``new_p`` (layer 0's
    key, its value, layer 1's key, ...), all ``count`` rows; ``rows``, ``count`` and ``used`` are dynamic.
    Written as TVMScript text because its parameter list depends on ``planes``."""
    source = _header("append_rows", APPEND_ROWS, planes, heads, width, dtype, width, dtype) + f"""
    for p, i, h, w in T.grid(T.int64({planes}), count, T.int64({heads}), T.int64({width})):
        with T.sblock("append"):
            vp, vi, vh, vw = T.axis.remap("SSSS", [p, i, h, w])
            cache[vp // T.int64(2), vp % T.int64(2), used + vi, vh, vw] = {_plane_value(planes, "vw")}
"""
    return tvm.script.from_source(source)


def _header(name: str, kind: str, planes: int, heads: int, width: int, dtype: str, written: int,
            cache_dtype: str) -> str:
    """An append kernel's TVMScript text up to its loops: ``name(cache, new_0, .., used)`` of our ``kind``, the new
    rows ``[count, heads, 1, width]`` of ``dtype``, the cache ``[planes / 2, 2, rows, heads, written]`` of
    ``cache_dtype``."""
    params = "".join(f", new_{plane}_handle: T.handle" for plane in range(planes))
    shape = f"(count, T.int64({heads}), T.int64(1), T.int64({width}))"
    matches = "".join(f"\n    new_{plane} = T.match_buffer(new_{plane}_handle, {shape}, \"{dtype}\")"
                      for plane in range(planes))
    return f"""
@T.prim_func(s_tir=True, private=True)
def {name}(cache_handle: T.handle{params}, used: T.int64):
    T.func_attr({{"tirx.noalias": True, "{KERNEL_ATTR}": "{kind}"}})
    rows, count = T.int64(), T.int64()
    cache = T.match_buffer(cache_handle, (T.int64({planes // 2}), T.int64(2), rows, T.int64({heads}),
                                          T.int64({written})), "{cache_dtype}"){matches}"""


def _plane_value(planes: int, column: str) -> str:
    """The new row's value at ``column`` of the block's plane ``vp``, row ``vi`` and head ``vh`` (TVMScript)."""
    value = f"new_{planes - 1}[vi, vh, T.int64(0), {column}]"
    for plane in reversed(range(planes - 1)):
        value = f"T.if_then_else(vp == T.int64({plane}), new_{plane}[vi, vh, T.int64(0), {column}], {value})"
    return value


def append_quantized_rows_kernel(planes: int, heads: int, width: int, quantize: RowQuantize,
                                 part: int) -> tirx.PrimFunc:
    """As :func:`append_rows_kernel` for new float32 rows ``new_p`` ``[count, heads, 1, width]`` that the kernel
    quantizes per head as the graph's run-time row quantization does (its largest magnitude, the scale ``max(m,
    eps) / qmax``, the values ``int8(clip(round(x / scale), -qmax, qmax))``), writing ``part`` of it: 0 the int8
    values (``width`` per head), 1 the scales (one). A row kernel for GPUs (a block per plane, row and head: the
    magnitude reduced across its threads); the step's quantizations of its keys and values then feed only its
    attentions, which compute them themselves."""
    qmax, eps = f"T.float32({float(quantize.qmax)!r})", f"T.float32({float(quantize.eps)!r})"
    x, scale = _plane_value(planes, "vw"), f"T.max(magnitude[vp, vi, vh], {eps}) / {qmax}"
    quantized = f"T.Cast(\"int8\", T.max(T.min(T.round({x} / ({scale})), {qmax}), -{qmax}))"
    written, dtype, stored = (width, "int8", quantized) if part == 0 else (1, "float32", scale)
    source = _header("append_quantized_rows", APPEND_QUANTIZED_ROWS, planes, heads, width, "float32", written,
                     dtype) + f"""
    with T.sblock("root"):
        magnitude = T.sblock_alloc_buffer((T.int64({planes}), count, T.int64({heads})), "float32")
        for p, i, h, w in T.grid(T.int64({planes}), count, T.int64({heads}), T.int64({width})):
            with T.sblock("magnitude"):
                vp, vi, vh, vw = T.axis.remap("SSSR", [p, i, h, w])
                with T.init():
                    magnitude[vp, vi, vh] = T.min_value("float32")
                magnitude[vp, vi, vh] = T.max(magnitude[vp, vi, vh], T.abs({x}))
        for p, i, h, w in T.grid(T.int64({planes}), count, T.int64({heads}), T.int64({written})):
            with T.sblock("append"):
                vp, vi, vh, vw = T.axis.remap("SSSS", [p, i, h, w])
                cache[vp // T.int64(2), vp % T.int64(2), used + vi, vh, vw] = {stored}
"""
    return tvm.script.from_source(source)
