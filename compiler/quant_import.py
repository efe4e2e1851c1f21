"""Import of int8mt's quantization custom ops (:mod:`int8mt.quant.ops`) into Relax.

Passed to ``from_exported_program(custom_convert_map=quant_convert_map(program))``. Static scales are IR constants
and map onto ``relax.op.quantize``/``dequantize`` (symmetric: zero point 0, a clip to +-qmax*scale first so
that INT6 and the -128 code never appear). Scales that are not constants (run-time ranges, embedding rows
gathered by token) become the same arithmetic spelled out: ``astype(clip(round(x / s)))`` and
``astype(q, float32) * s``, which the scale-propagation pass recognises as (de)quantization too.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from tvm import relax

from int8mt.quant.ops import EPS

from .passes.quantize_rows import quantized, row_quantization

Converter = Callable[[torch.fx.Node, object], relax.Expr]


def quant_convert_map(program: torch.export.ExportedProgram) -> dict[str, Converter]:
    """Converters for the custom ops of ``program``; they read scale values from its parameters/buffers
    (the importer binds those only after conversion, so they are plain variables while it runs)."""
    tensors = {**program.state_dict, **program.constants}
    by_node = {spec.arg.name: tensors[spec.target] for spec in program.graph_signature.input_specs
               if spec.target in tensors}

    def value_of(node) -> np.ndarray | None:
        tensor = by_node.get(getattr(node, "name", None))
        return None if tensor is None else tensor.detach().cpu().numpy()

    return {
        "quantize.default": lambda node, importer: _quantize(node, importer, value_of(node.args[1])),
        "dequantize.default": lambda node, importer: _dequantize(node, importer, value_of(node.args[1])),
        "quantize_dynamic.default": _quantize_dynamic,
    }


def _quantize(node, importer, value: np.ndarray | None) -> relax.Expr:
    bb = importer.block_builder
    x, scale = importer.env[node.args[0]], importer.env[node.args[1]]
    qmax = int(node.args[2])
    if value is not None and value.size == 1:
        s = float(value.reshape(()))
        clipped = bb.emit(relax.op.clip(x, -qmax * s, qmax * s))
        return bb.emit(relax.op.quantize(clipped, relax.const(s, "float32"), relax.const(0, "int8"), axis=-1))
    return quantized(bb, x, scale, qmax)


def _dequantize(node, importer, value: np.ndarray | None) -> relax.Expr:
    bb = importer.block_builder
    q, scale = importer.env[node.args[0]], importer.env[node.args[1]]
    rank = q.ty.ndim
    if value is not None:
        varying = [i for i, n in enumerate(value.shape) if n != 1]
        zero = relax.const(0, "int8")
        if value.size == 1:
            return bb.emit(relax.op.dequantize(q, relax.const(float(value.reshape(())), "float32"), zero, axis=-1))
        if len(varying) == 1 and value.ndim == rank:
            return bb.emit(relax.op.dequantize(q, relax.const(value.reshape(-1), "float32"), zero, axis=varying[0]))
    return bb.emit(relax.op.multiply(relax.op.astype(q, "float32"), scale))


def _quantize_dynamic(node, importer) -> relax.Expr:
    bb = importer.block_builder
    x = importer.env[node.args[0]]
    return row_quantization(bb, x, int(node.args[1]), EPS, axis=int(node.args[2]))

