"""PyTorch -> Relax: ``torch.export`` with dynamic batch and lengths, then ``from_exported_program``.

The result is one IRModule with five entry points:

* ``encode(src[B, S] int64) -> cross_kv[L, 2, B, H, S, Dh]``: encoder plus every decoder layer's
  cross-attention keys/values, computed once per batch;
* ``decode_step(tokens[B, 1] int64, step[1] int64, cache_0[L, 2, N, H, Dh], history[B, T + 1] int64,
  cross_0, src, rows_used) -> (logits[B, V], cache_0)``: one token, projections O(1) in the prefix; each layer's
  new key and value ([B, H, 1, Dh]) written into the cache's rows after its first ``used`` (``rows_used`` is the
  shape ``[used]``), in place, by one kernel (:mod:`int8mt.schedules.append_rows`; see
  :mod:`int8mt.model.transformer` for the layout, :func:`appending_step`);
* ``reorder_cache(cross_kv, rows[B'] int64) -> cross_kv[L, 2, B', H, S, Dh]``: the cross-attention keys/values
  of hypotheses taken in a new order (beams of one sentence, finished sentences dropped), on the device;
* ``top_candidates(logits[B, V]) -> (values[B, K], ids[B, K] int64, log_sum_exp[B])``: each row's
  ``K = candidates_per_row(model)`` largest logits and the row's log-sum-exp (their log-probabilities are
  ``values - log_sum_exp``): beam search reads these instead of the whole ``[B, V]`` logits;
* ``select_beams(values, ids, log_sum_exp, state[n, k + 1] float64, eos_banned[1] int64) -> chosen[PLANES, n, k]
  float64``: each sentence's next hypotheses from its ``k`` rows' candidates, its hypotheses' scores and finished
  count (:mod:`int8mt.schedules.beam_select`), so that only those cross to the host.

Both caches have the model's ``cache_dtype``: int8 for quantized attention, else float32. With run-time ranges
(``model.cache_scales``) each cache is two tensors, the int8 keys/values and their scales (``[..., 1]`` in place
of ``Dh``): ``encode`` returns both, ``decode_step`` takes ``cache_0, cache_1`` and ``cross_0, cross_1``, writes
the new scales into ``cache_1`` and returns both, and ``reorder_cache`` takes both and returns both.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import tvm
from torch import Tensor, nn
from torch.export import Dim
from tvm import relax
from tvm.relax.frontend.torch import from_exported_program

from int8mt.model.transformer import Transformer
from int8mt.runtime.bundle import DEFAULT_MAX_ROWS
from int8mt.schedules.append_rows import append_rows_kernel
from int8mt.schedules.beam_select import PLANES, beam_select_kernel
from int8mt.schedules.top_candidates import top_candidates_kernel

PYTREE_DEPRECATION = r"`isinstance\(treespec, LeafSpec\)` is deprecated"  # torch 2.13, at every import of a model


class _Encode(nn.Module):
    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, src: Tensor) -> tuple[Tensor, ...]:
        return self.model.cross_kv(self.model.encode(src))


class _DecodeStep(nn.Module):
    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, step: Tensor, cache: tuple[Tensor, ...], history: Tensor,
                cross: tuple[Tensor, ...], src: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        return self.model.decode_step(tokens, step, cache, history, cross, src)


@dataclass(frozen=True)
class ExportConfig:
    """Example inputs and named dynamic dimensions of both entry points (as optimum's export configs).

    A dimension's maximum reaches the Relax functions (``tir_var_upper_bound``), where TVM's memory planner
    allocates each intermediate buffer whose size depends on it once, at that size. Positions carry theirs, so a
    decoder step's buffers keep their size from step to step. Rows and source length do not (the runtime checks
    ``max_batch``): at 1024 rows of the longest source the reference model's encoder buffers took 3 GiB, which a
    GPU commits whole and a CPU reserves (opus-mt shape: 3.5 GiB of address space against 0.5, no faster)."""

    max_batch: int = DEFAULT_MAX_ROWS

    def encode_inputs(self, model: Transformer) -> tuple[tuple[Tensor, ...], dict]:
        src = torch.full((2, 5), 4, dtype=torch.int64)
        batch, src_len = self._dims()
        return (src,), {"src": {0: batch, 1: src_len}}

    def decode_inputs(self, model: Transformer) -> tuple[tuple[Tensor, ...], dict]:
        c = model.cfg
        batch, src_len = self._dims()
        positions = Dim("positions", min=1, max=c.max_positions)
        cache_rows = Dim("cache_rows", min=1)
        parts = 2 if model.cache_scales else 1
        widths = (c.head_dim, 1)[:parts]  # the keys/values' last axis, then their scales'
        cache = tuple(torch.zeros(c.decoder_layers, 2, 7, c.heads, w, dtype=d)
                      for w, d in zip(widths, (model.cache_dtype, torch.float32)))
        cross = tuple(torch.zeros(c.decoder_layers, 2, 2, c.heads, 5, w, dtype=d)
                      for w, d in zip(widths, (model.cache_dtype, torch.float32)))
        inputs = (torch.full((2, 1), 4, dtype=torch.int64), torch.tensor([3], dtype=torch.int64), cache,
                  torch.tensor([[1, 3, 5, 0], [2, 4, 6, 0]]), cross, torch.full((2, 5), 4, dtype=torch.int64))
        shapes = {"tokens": {0: batch}, "step": None, "cache": ({2: cache_rows},) * parts,
                  "history": {0: batch, 1: positions}, "cross": ({2: batch, 4: src_len},) * parts,
                  "src": {0: batch, 1: src_len}}
        return inputs, shapes

    def _dims(self) -> tuple[Dim, Dim]:
        return Dim("batch", min=1), Dim("src_len", min=1)


def export_to_relax(model: Transformer, export_cfg: ExportConfig = ExportConfig(),
                    convert_map: Callable[[torch.export.ExportedProgram], dict] | None = None) -> tvm.IRModule:
    """Export ``model`` (eval mode) and import both entry points into one Relax IRModule; ``convert_map``
    builds ``from_exported_program``'s custom converters for each exported program."""
    model = model.eval()
    functions = {}
    for name, wrapper, (inputs, shapes) in (
        ("encode", _Encode(model), export_cfg.encode_inputs(model)),
        ("decode_step", _DecodeStep(model), export_cfg.decode_inputs(model)),
    ):
        with torch.no_grad():
            program = torch.export.export(wrapper, inputs, dynamic_shapes=shapes)
        custom = {"embedding.default": _embedding, **(convert_map(program) if convert_map is not None else {})}
        with warnings.catch_warnings():  # torch's decompositions (TVM runs them) copy a deprecated pytree class
            warnings.filterwarnings("ignore", PYTREE_DEPRECATION, FutureWarning)
            mod = from_exported_program(program, custom_convert_map=custom, unwrap_unit_return_tuple=True)
        functions[name] = mod["main"].with_attr("global_symbol", name)
    functions["reorder_cache"] = _reorder_cache(model)
    mod = tvm.IRModule({relax.GlobalVar(name): fn for name, fn in functions.items()})
    mod = _with_select_beams(_with_top_candidates(mod, model), model)
    c = model.cfg
    return appending_step(mod, c.decoder_layers, c.heads, c.head_dim, model.cache_dtype_name, model.cache_scales)


def _embedding(node: torch.fx.Node, importer) -> relax.Expr:
    """``aten.embedding``: rows of the table taken at the token ids as they come (int64). TVM's own converter casts
    the ids to int32 first, which on a GPU is a kernel of its own per call (a reshape between the cast and the
    ``take`` keeps them apart); ``take`` reads int64 ids as well."""
    bb = importer.block_builder
    table, ids = importer.env[node.args[0]], importer.env[node.args[1]]
    if ids.ty.ndim == 1:
        return bb.emit(relax.op.take(table, ids, axis=0))
    rows = bb.emit(relax.op.take(table, bb.emit(relax.op.reshape(ids, [-1])), axis=0))
    return bb.emit(relax.op.reshape(rows, [*ids.ty.shape, table.ty.shape[-1]]))


def appending_step(mod: tvm.IRModule, layers: int, heads: int, head_dim: int, dtype: str,
                   scales: bool) -> tvm.IRModule:
    """``mod`` with its ``decode_step`` writing the step's new keys and values (and their scales) into the cache
    after its first ``rows_used`` rows, in place (one kernel per cache tensor:
    :mod:`int8mt.schedules.append_rows`), and returning the logits and the cache tensors: ``decode_step(tokens,
    step, cache_0, .., history, cross_0, .., src, rows_used)``. The exported step returns the new rows instead."""
    step_var = mod.get_global_var("decode_step")
    step = mod[step_var]
    body, rows = step.body, step.body.body  # rows: (logits, layer 0's new key, its value, ..., then the scales)
    used = tvm.tirx.Var("used", "int64")
    at = relax.Var("rows_used", relax.ShapeType([used]))
    parts = [(head_dim, dtype)] + [(1, "float32")] * scales
    caches = step.params[2:2 + len(parts)]
    planes = 2 * layers
    bb = relax.BlockBuilder(mod)
    bindings, written = [], []
    for index, (cache, (width, kind)) in enumerate(zip(caches, parts)):
        kernel = bb.add_func(append_rows_kernel(planes, heads, width, kind), "append_rows")
        new = [relax.TupleGetItem(rows, 1 + index * planes + p) for p in range(planes)]
        written.append(relax.Var(f"{cache.name}_written", cache.ty))
        bindings.append(relax.VarBinding(written[-1], relax.op.call_tir_inplace(
            kernel, relax.Tuple([cache, *new, relax.prim_value(used)]), 0, cache.ty)))
    out = relax.Tuple([relax.TupleGetItem(rows, 0), *written])
    ret = relax.TupleType([rows.ty.fields[0], *(c.ty for c in caches)])
    mod = bb.get()
    mod[step_var] = relax.Function([*step.params, at], relax.SeqExpr([*body.blocks, relax.BindingBlock(bindings)], out),
                                   ret, step.is_pure, step.attrs)
    return relax.transform.Normalize()(mod)


def _reorder_cache(model: Transformer) -> relax.Function:
    c = model.cfg
    batch, src_len, rows = (tvm.tirx.Var(name, "int64") for name in ("batch", "src_len", "rows"))
    parts = [("cross_kv", c.head_dim, model.cache_dtype_name)] + [("cross_scales", 1, "float32")] * model.cache_scales
    caches = [relax.Var(name, relax.TensorType((c.decoder_layers, 2, batch, c.heads, src_len, width), dtype))
              for name, width, dtype in parts]
    index = relax.Var("rows", relax.TensorType((rows,), "int64"))
    bb = relax.BlockBuilder()
    with bb.function("reorder_cache", [*caches, index]):
        with bb.dataflow():
            taken = [bb.emit(relax.op.take(cache, index, axis=2)) for cache in caches]
            out = bb.emit_output(taken[0] if len(taken) == 1 else relax.Tuple(taken))
        bb.emit_func_output(out)
    return bb.get()["reorder_cache"]


TOP_CANDIDATES = 16  # candidates per row for beam search (enough for beams of up to 8: it needs 2 x beam)


def candidates_per_row(model: Transformer) -> int:
    """How many candidates per row ``top_candidates`` returns for ``model`` (at most its vocabulary)."""
    return min(TOP_CANDIDATES, model.cfg.output_vocab_size)


def _with_top_candidates(mod: tvm.IRModule, model: Transformer) -> tvm.IRModule:
    """``mod`` with the entry point ``top_candidates``: the CPU's :func:`top_candidates_kernel` on the logits (one
    kernel for the candidates and the log-sum-exp, which reads each row where the search just did)."""
    rows = tvm.tirx.Var("rows", "int64")
    logits = relax.Var("logits", relax.TensorType((rows, model.cfg.output_vocab_size), "float32"))
    k = candidates_per_row(model)
    outputs = [relax.TensorType((rows, k), "float32"), relax.TensorType((rows, k), "int64"),
               relax.TensorType((rows,), "float32")]
    bb = relax.BlockBuilder(mod)
    with bb.function("top_candidates", [logits]):
        kernel = bb.add_func(top_candidates_kernel(k), "row_candidates")
        with bb.dataflow():
            out = bb.emit_output(relax.call_tir(kernel, [logits], outputs))
        bb.emit_func_output(out)
    return bb.get()


def _with_select_beams(mod: tvm.IRModule, model: Transformer) -> tvm.IRModule:
    """``mod`` with the entry point ``select_beams``: the CPU's :func:`beam_select_kernel` on the rows'
    candidates and the sentences' state, the model's end of sentence and pad token (its scratch output dropped)."""
    rows, width, n, columns = (tvm.tirx.Var(name, "int64") for name in ("rows", "width", "n", "columns"))
    params = [relax.Var("values", relax.TensorType((rows, width), "float32")),
              relax.Var("ids", relax.TensorType((rows, width), "int64")),
              relax.Var("log_sum_exp", relax.TensorType((rows,), "float32")),
              relax.Var("state", relax.TensorType((n, columns), "float64")),
              relax.Var("eos_banned", relax.TensorType((1,), "int64"))]
    outputs = [relax.TensorType((PLANES, n, columns - 1), "float64"), relax.TensorType((n, columns - 1), "int64")]
    eos, pad = (relax.prim_value(tvm.tirx.IntImm("int64", token)) for token in (model.cfg.eos_id, model.cfg.pad_id))
    bb = relax.BlockBuilder(mod)
    with bb.function("select_beams", params):
        kernel = bb.add_func(beam_select_kernel(), "beam_select")
        with bb.dataflow():
            chosen = bb.emit(relax.call_tir(kernel, [*params, eos, pad], outputs))
            out = bb.emit_output(relax.TupleGetItem(chosen, 0))
        bb.emit_func_output(out)
    return bb.get()
