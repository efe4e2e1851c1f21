"""Relax import of the entry points against PyTorch, on several dynamic shapes."""
import warnings

import numpy as np
import pytest
import torch
import tvm
import tvm_ffi
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from int8mt.compiler.frontend import appending_step, export_to_relax
from int8mt.compiler.pipeline import relax_pipeline

from ..conftest import HOST_PRESET

TARGET = tvm.target.Target(HOST_PRESET.target)


@pytest.fixture(scope="module")
def vm(tiny_model):
    mod = export_to_relax(tiny_model)
    entry_points = {gv.name_hint for gv, func in mod.functions_items() if isinstance(func, relax.Function)}
    assert entry_points == {"encode", "decode_step", "reorder_cache", "top_candidates", "select_beams"}
    return relax.VirtualMachine(tvm.compile(mod, TARGET, relax_pipeline=relax_pipeline(TARGET)), tvm.cpu())


def test_import_shows_no_deprecation_of_torch_s_own_internals(tiny_model):
    """torch's decompositions, which TVM's importer runs, copy a deprecated pytree class: a FutureWarning (twice
    per model) about code that is neither ours nor the user's."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        export_to_relax(tiny_model)
    assert not [w for w in seen if "LeafSpec" in str(w.message)]


def _src(batch: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, 8000, (batch, length), generator=g)
    if batch > 1 and length > 2:
        src[-1, length // 2:] = 0  # padding in the last row
    return src


@pytest.mark.parametrize("batch,length", [(1, 1), (1, 9), (3, 7), (8, 20)])
def test_encode_matches_pytorch(vm, tiny_model, batch, length):
    src = _src(batch, length, seed=batch * 100 + length)
    with torch.no_grad():
        (expected,) = (c.numpy() for c in tiny_model.cross_kv(tiny_model.encode(src)))
    got = vm["encode"](tvm.runtime.tensor(src.numpy())).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("batch,length,steps", [(1, 5, 3), (4, 11, 6), (2, 3, 1)])
def test_decode_steps_match_pytorch(vm, tiny_model, batch, length, steps):
    """Teacher forcing through the compiled steps reproduces the model's logits, and each step writes its keys and
    values into the cache's rows after the ``rows_used`` first, in place, as the model's ``append_rows`` appends
    them; halfway, the hypotheses are put in a new order by reordering only ``history``'s rows (and the
    cross-attention rows), as beam search does."""
    src = _src(batch, length, seed=length)
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(4, 8000, (batch, steps), generator=g)
    with torch.no_grad():
        cross = tiny_model.cross_kv(tiny_model.encode(src))
        full = tiny_model(src, tokens)  # teacher forcing: the step outputs must reproduce it
    expected_cache, history = tiny_model.empty_cache(batch)
    (expected_rows,) = expected_cache
    rows = np.zeros((*expected_rows.shape[:2], 1 + batch * steps + 3, *expected_rows.shape[3:]), np.float32)
    buffer = tvm.runtime.tensor(rows)  # room for every step's rows and more, written in place
    order = np.arange(batch)
    for t in range(steps):
        if t == steps // 2:  # e.g. [0, 1, 2, 3] -> [3, 0, 1, 2]
            order, reordered = np.roll(order, 1), np.roll(np.arange(batch), 1)
            history, cross = history[reordered], tuple(c[:, :, reordered] for c in cross)
        used = expected_rows.shape[2]
        inputs = (tokens[order, t:t + 1], torch.tensor([t]), (expected_rows,), history, cross, src[order])
        logits, written = vm["decode_step"](*(tvm.runtime.tensor(np.ascontiguousarray(a)) for a in (
            inputs[0].numpy(), inputs[1].numpy())), buffer, tvm.runtime.tensor(history.numpy()),
            tvm.runtime.tensor(cross[0].numpy()), tvm.runtime.tensor(src[order].numpy()), tvm_ffi.Shape((used,)))
        with torch.no_grad():
            _, new_kv = tiny_model.decode_step(*inputs)
        (expected_rows,), history = tiny_model.append_rows((expected_rows,), history, new_kv)
        np.testing.assert_allclose(logits.numpy(), full[order, t].numpy(), atol=1e-4, rtol=0)
        assert written.same_as(buffer) or written.data_ptr() == buffer.data_ptr()
        np.testing.assert_allclose(buffer.numpy()[:, :, :used + batch], expected_rows.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_array_equal(buffer.numpy()[:, :, used + batch:], 0)  # nothing past the step's rows


def test_reorder_cache_takes_rows(vm, tiny_model):
    cache = np.random.default_rng(0).standard_normal((2, 2, 3, 4, 5, 8)).astype("float32")
    rows = np.array([2, 2, 0, 1], np.int64)
    got = vm["reorder_cache"](tvm.runtime.tensor(cache), tvm.runtime.tensor(rows)).numpy()
    np.testing.assert_array_equal(got, cache[:, :, rows])


def test_only_positions_carry_their_maximum(tiny_model):
    """The memory planner sizes buffers by these bounds: a step's by the most positions, every buffer by its
    call's rows and source length."""
    mod = export_to_relax(tiny_model)
    step = mod["decode_step"]
    positions = str(step.params[3].ty.shape[1])  # history [rows, positions]
    assert {str(k): int(v) for k, v in step.attrs["tir_var_upper_bound"].items()} == {
        positions: tiny_model.cfg.max_positions}
    assert "tir_var_upper_bound" not in mod["encode"].attrs


def test_embeddings_take_rows_at_the_token_ids_as_they_come(tiny_model):
    """``encode`` and ``decode_step`` take the embeddings' rows at their int64 token ids: no cast to int32 first
    (TVM's converter's, a kernel of its own per call on a GPU); their values: the tests above."""
    mod = export_to_relax(tiny_model)
    for name, ids in (("encode", "src"), ("decode_step", "tokens")):
        calls = []
        relax.analysis.post_order_visit(mod[name], lambda e: calls.append(e) if (
            isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op)) else None)
        assert not [c for c in calls if c.op.name == "relax.astype" and str(c.attrs.dtype) == "int32"], name
        index = {b.var: b.value for block in mod[name].body.blocks for b in block.bindings}
        taken = [c.args[1] for c in calls if c.op.name == "relax.take" and c.args[1] in index]
        assert any(index[i].op.name == "relax.reshape" and index[i].args[0].name == ids for i in taken), name


def test_the_step_writes_every_plane_of_its_rows_in_place_in_one_kernel():
    """``appending_step``: the exported step's new keys and values (one tensor per layer and kind) go to rows
    ``used ..`` of each plane of the cache, in place, in one kernel whichever the plane, and the step returns the
    logits and the cache (here one layer of two heads of 4)."""
    @I.ir_module
    class Before:
        @R.function
        def decode_step(tokens: R.Tensor(("batch", 1), dtype="int64"), step: R.Tensor((1,), dtype="int64"),
                        cache_0: R.Tensor((1, 2, "rows", 2, 4), dtype="int8"),
                        history: R.Tensor(("batch", "positions"), dtype="int64"),
                        cross_0: R.Tensor((1, 2, "batch", 2, "src_len", 4), dtype="int8"),
                        src: R.Tensor(("batch", "src_len"), dtype="int64")):
            batch = T.int64()
            with R.dataflow():
                k = R.zeros(R.shape([batch, 2, 1, 4]), dtype="int8")
                v = R.ones(R.shape([batch, 2, 1, 4]), dtype="int8")
                logits = R.astype(tokens, dtype="float32")
                gv = (logits, k, v)
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @T.prim_func(private=True, s_tir=True)
        def append_rows(cache_handle: T.handle, new_0_handle: T.handle, new_1_handle: T.handle, used: T.int64):
            T.func_attr({"int8mt.kernel": "append_rows", "tirx.noalias": True})
            kernel_rows, kernel_count = T.int64(), T.int64()  # the kernel's own variables
            cache = T.match_buffer(cache_handle, (T.int64(1), T.int64(2), kernel_rows, T.int64(2), T.int64(4)), "int8")
            new_0 = T.match_buffer(new_0_handle, (kernel_count, T.int64(2), T.int64(1), T.int64(4)), "int8")
            new_1 = T.match_buffer(new_1_handle, (kernel_count, T.int64(2), T.int64(1), T.int64(4)), "int8")
            for p, i, h, w in T.grid(T.int64(2), kernel_count, T.int64(2), T.int64(4)):
                with T.sblock("append"):
                    vp, vi, vh, vw = T.axis.remap("SSSS", [p, i, h, w])
                    cache[vp // T.int64(2), vp % T.int64(2), used + vi, vh, vw] = T.if_then_else(
                        vp == T.int64(0), new_0[vi, vh, T.int64(0), vw], new_1[vi, vh, T.int64(0), vw])

        @R.function
        def decode_step(tokens: R.Tensor(("batch", 1), dtype="int64"), step: R.Tensor((1,), dtype="int64"),
                        cache_0: R.Tensor((1, 2, "rows", 2, 4), dtype="int8"),
                        history: R.Tensor(("batch", "positions"), dtype="int64"),
                        cross_0: R.Tensor((1, 2, "batch", 2, "src_len", 4), dtype="int8"),
                        src: R.Tensor(("batch", "src_len"), dtype="int64"), rows_used: R.Shape(["used"])):
            batch, rows, used = T.int64(), T.int64(), T.int64()
            cls = Expected
            with R.dataflow():
                k = R.zeros(R.shape([batch, 2, 1, 4]), dtype="int8")
                v = R.ones(R.shape([batch, 2, 1, 4]), dtype="int8")
                logits = R.astype(tokens, dtype="float32")
                gv = (logits, k, v)
                R.output(gv)
            written = R.call_tir_inplace(cls.append_rows, (cache_0, gv[1], gv[2], R.prim_value(used)),
                                         out_ty=R.Tensor((1, 2, rows, 2, 4), dtype="int8"), inplace_indices=[0])
            return (gv[0], written)

    tvm.ir.assert_structural_equal(appending_step(Before, 1, 2, 4, "int8", False), Expected)
