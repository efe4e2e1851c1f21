"""Check the compiled integer graph against the NumPy integer reference, matmul by matmul.

The quantized model is compiled by the bundle's pipeline (:mod:`.pipeline`, with the same tiles) with
:class:`~.passes.TapIntMatmuls` returning every integer matmul's
operands and result. Running ``encode`` and a few decoder steps on the same inputs in the compiled graph
and in :class:`~int8mt.quant.integer_model.IntegerTransformer` gives, per matmul: whether its int32 result
is exactly the integer product of its own operands (the kernels and the integer ops around them), and how
far its operands are from the reference's (the whole graph; see that module for why one step).
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

from int8mt.model.transformer import Transformer
from int8mt.quant.config import QuantConfig
from int8mt.quant.integer_model import IntegerTransformer, MatmulRecord
from int8mt.schedules.database import TileChooser
from int8mt.targets import TargetPreset

from .pipeline import CompileOptions, compile_module, import_model, integer_graph


class GraphMismatch(RuntimeError):
    """The compiled graph's integer matmuls do not line up with the reference's (a bug to report)."""


@dataclass(frozen=True)
class MatmulCheck:
    """One matmul of one call: its result against its operands, and its operands against the reference."""

    function: str
    name: str
    shape: tuple[int, ...]
    exact: bool                 # int32 result == integer product of the compiled graph's own operands
    operands_equal: float       # fraction of operand elements equal to the reference's
    operands_max_diff: int      # largest |compiled - reference| over the operands, in quantization steps
    result_equal: float         # fraction of result elements equal to the reference's

    def to_dict(self) -> dict:
        return asdict(self)


def compile_tapped(model: Transformer, preset: TargetPreset, tiles: TileChooser | None,
                   float_tiles: TileChooser | None, qcfg: QuantConfig) -> relax.VirtualMachine:
    """The quantized ``model`` compiled for ``preset`` (``tiles`` and ``float_tiles`` as
    :func:`~.pipeline.tile_choosers` gives them) with every integer matmul tapped."""
    options = CompileOptions(preset, qcfg, tiles, tap_matmuls=True, float_tiles=float_tiles)
    mod = integer_graph(import_model(model, options), options)
    print(f"compiling the tapped integer graph for {preset.name}", file=sys.stderr)
    return relax.VirtualMachine(compile_module(mod, preset), tvm.cpu())


def check_integer_graph(model: Transformer, vm: relax.VirtualMachine, src: np.ndarray, tokens: np.ndarray,
                        qcfg: QuantConfig) -> list[MatmulCheck]:
    """Run ``encode(src)`` and one decoder step per column of ``tokens`` [B, steps] in the compiled graph
    ``vm`` (from :func:`compile_tapped`) and in the reference; compare every matmul. Each call of the
    reference gets the compiled graph's inputs (its cross-attention keys/values and cache), so that a
    difference is checked where it arises and does not carry over into later calls."""
    reference = IntegerTransformer(model, qcfg.integer_softmax, qcfg.integer_layer_norm)
    checks = []

    def call(name: str, reference_call, *args: np.ndarray, shape: tuple[int, ...] = ()):
        reference.records.clear()
        expected = reference_call(*args)
        out, taps = vm[name](*(tvm.runtime.tensor(a) for a in args), *([tvm_ffi.Shape(shape)] if shape else []))
        checks.extend(_compare(name, reference.records, [t.numpy() for t in taps]))
        return out, expected

    cross = _arrays(call("encode", reference.encode, src)[0])
    cache, history = model.empty_cache(len(src))
    cache, parts = tuple(c.numpy() for c in cache), len(cache)
    for step in range(tokens.shape[1]):
        column = np.ascontiguousarray(tokens[:, step:step + 1])
        used = cache[0].shape[2]
        room = tuple(np.concatenate([c, np.zeros((*c.shape[:2], len(src), *c.shape[3:]), c.dtype)], axis=2)
                     for c in cache)  # the step writes its rows after the ``used`` first

        def reference_step(*args: np.ndarray):
            *cache_in, history_in = args[2:3 + parts]
            return reference.decode_step(column, step, tuple(cache_in), history_in, args[3 + parts:-1], args[-1])

        (_, *written), _ = call("decode_step", reference_step, column, np.array([step]), *room, history.numpy(),
                                *cross, src, shape=(used,))
        cache, history = tuple(t.numpy() for t in written), model.next_history(history, used)
    return checks


def _arrays(out) -> tuple[np.ndarray, ...]:
    """An entry point's result (a tensor, or a tuple of them) as NumPy arrays."""
    return (out.numpy(),) if hasattr(out, "numpy") else tuple(t.numpy() for t in out)


def _compare(function: str, records: list[MatmulRecord], taps: list[np.ndarray]) -> list[MatmulCheck]:
    expected = sum(2 if r.weight else 3 for r in records)
    if len(taps) != expected:
        raise GraphMismatch(f"{function}: the compiled graph has {len(taps)} matmul taps, the reference "
                             f"{len(records)} integer matmuls ({expected} taps): the graphs differ")
    checks, taps = [], iter(taps)
    for r in records:
        a = _like(next(taps), r.a, function, r.name)
        b = r.b if r.weight else _like(next(taps), r.b, function, r.name)
        out = _like(next(taps), r.out, function, r.name)
        product = np.matmul(a.astype(np.int32), b.astype(np.int32))
        operands = [(a, r.a)] + ([] if r.weight else [(b, r.b)])
        diff = max(int(np.abs(x.astype(np.int32) - y.astype(np.int32)).max(initial=0)) for x, y in operands)
        equal = sum(int(np.sum(x == y)) for x, y in operands) / sum(y.size for _, y in operands)
        checks.append(MatmulCheck(function, r.name, tuple(r.out.shape), bool(np.array_equal(out, product)),
                                  equal, diff, float(np.mean(out == r.out))))
    return checks


def _like(tap: np.ndarray, reference: np.ndarray, function: str, name: str) -> np.ndarray:
    """A tapped tensor in the reference's layout (the graph may flatten batch and heads)."""
    if tap.size != reference.size or tap.dtype != reference.dtype:
        raise GraphMismatch(f"{function}/{name}: compiled {tap.dtype}{list(tap.shape)} does not match the "
                             f"reference's {reference.dtype}{list(reference.shape)}")
    return tap.reshape(reference.shape)
