"""FuseAttentionEpilogue (after OneQueryAttention): the scores' dequantization (the direct scores' with the
mask added) and the context's requantization into the output projection's rows become the one-query kernels'
epilogues (structure); a chain that reads a tensor its kernel cannot take, or follows a result with another use,
is left alone; the compiled graph equals the unfused one bit for bit and NumPy's, for dynamic sizes."""
import numpy as np
import pytest
import tvm
from tvm import relax

from int8mt.compiler.passes import FuseAttentionEpilogue, OneQueryAttention
from int8mt.compiler.pipeline import relax_pipeline

from ...conftest import HOST_PRESET

H, D = 4, 16
SCALE, MULTIPLIER, SHIFT = 0.0125, 1 << 28, 30
RNG = np.random.default_rng(5)


def _module(direct: bool = False, masked: bool = False, shared: bool = False) -> tvm.IRModule:
    """``main``: a step's int8 QK^T, dequantized (``masked``: plus a mask [b, 1, 1, t]), and softmax·V requantized
    into rows of the heads side by side, as Scale Propagation leaves them; the keys and values gathered from the
    cache's rows, or (``direct``) stored per pair. ``shared``: the scores' int32 sums are also returned."""
    b, t, n = (tvm.tirx.Var(name, "int64") for name in ("b", "t", "n"))
    q = relax.Var("q", relax.TensorType([b * H, 1, D], "int8"))
    p = relax.Var("p", relax.TensorType([b * H, 1, t], "int8"))
    if direct:
        stored = [relax.Var("keys", relax.TensorType([b, H, t, D], "int8")),
                  relax.Var("values", relax.TensorType([b, H, t, D], "int8"))]
    else:
        stored = [relax.Var("rows", relax.TensorType([n, D], "int8")),
                  relax.Var("index", relax.TensorType([b, H, t], "int64")),
                  relax.Var("past", relax.TensorType([b, 1, t, 1], "bool")),
                  relax.Var("new", relax.TensorType([b, H, 1, D], "int8"))]
    mask = [relax.Var("mask", relax.TensorType([b, 1, 1, t], "float32"))] if masked else []
    bb = relax.BlockBuilder()
    with bb.function("main", [*stored, q, p, *mask]):
        with bb.dataflow():
            if direct:  # (the cross-attention's, per pair)
                keys, values = (bb.emit(relax.op.reshape(x, [b * H, t, D])) for x in stored)
            else:
                rows, index, past, new = stored
                keys, values = (bb.emit(relax.op.reshape(bb.emit(relax.op.where(past, bb.emit(relax.op.take(
                    rows, index, axis=0)), new)), [b * H, t, D])) for _ in range(2))
            sums = bb.emit(relax.op.matmul(q, bb.emit(relax.op.permute_dims(keys, [0, 2, 1])), out_dtype="int32"))
            scores = bb.emit(relax.op.multiply(bb.emit(relax.op.astype(bb.emit(relax.op.reshape(sums, [b, H, 1, t])),
                                                                       "float32")), relax.const(SCALE, "float32")))
            if masked:
                scores = bb.emit(relax.op.add(scores, mask[0]))
            context = bb.emit(relax.op.matmul(p, values, out_dtype="int32"))
            merged = bb.emit(relax.op.reshape(bb.emit(relax.op.permute_dims(
                bb.emit(relax.op.reshape(context, [b, H, 1, D])), [0, 2, 1, 3])), [b, 1, H * D]))
            wide = bb.emit(relax.op.multiply(bb.emit(relax.op.astype(merged, "int64")),
                                             relax.const(MULTIPLIER, "int64")))
            shifted = bb.emit(relax.op.right_shift(bb.emit(relax.op.add(wide, relax.const(1 << (SHIFT - 1), "int64"))),
                                                   relax.const(SHIFT, "int64")))
            requantized = bb.emit(relax.op.astype(bb.emit(relax.op.clip(shifted, -127, 127)), "int8"))
            out = bb.emit_output(relax.Tuple([scores, requantized, *([sums] if shared else [])]))
        bb.emit_func_output(out)
    return bb.get()


def _calls(mod: tvm.IRModule) -> list[str]:
    """The names of the functions ``main`` calls (call_tir) and of the ops it applies, in order."""
    names = []
    for binding in mod["main"].body.blocks[0].bindings:
        call = binding.value
        if isinstance(call, relax.Call):
            is_tir = call.op == tvm.ir.Op.get("relax.call_tir")
            names.append(call.args[0].name_hint if is_tir else call.op.name)
    return names


def test_structure_the_chains_become_the_kernels_epilogues():
    """Before: the gathered kernels, each followed by its chain. Expected: one call of each kernel, rebuilt with
    the chain as its epilogue, giving the chain's output (the kernels' code is checked against NumPy below)."""
    before = OneQueryAttention(16)(_module())
    after = FuseAttentionEpilogue()(before)
    scores_gv, context_gv = (gv for gv in after.get_global_vars() if gv.name_hint != "main")
    assert {scores_gv.name_hint, context_gv.name_hint} == {"gathered_scores_to_float32_0", "gathered_context_to_int8_1"}
    scores_gv, context_gv = sorted((scores_gv, context_gv), key=lambda gv: "context" in gv.name_hint)

    bb = relax.BlockBuilder()
    fused = [bb.add_func(after[gv], gv.name_hint) for gv in (scores_gv, context_gv)]
    params = list(before["main"].params)
    rows, index, past, new, q, p = params
    b, t = index.ty.shape[0], index.ty.shape[2]
    with bb.function("main", params):
        with bb.dataflow():
            scores = bb.emit(relax.call_tir(fused[0], [index, past, q, rows, new], relax.TensorType([b, H, 1, t],
                                                                                                   "float32")))
            rows_out = bb.emit(relax.call_tir(fused[1], [index, past, p, rows, new],
                                              relax.TensorType([b, 1, H * D], "int8")))
            out = bb.emit_output(relax.Tuple([scores, rows_out]))
        bb.emit_func_output(out)
    tvm.ir.assert_structural_equal(after, bb.get())


def test_the_direct_scores_take_the_mask_and_other_chains_stay():
    direct = _calls(FuseAttentionEpilogue()(OneQueryAttention(16)(_module(direct=True, masked=True))))
    assert "direct_scores_to_float32_0" in direct and "direct_context_to_int8_1" in direct
    assert "relax.add" not in direct and "relax.astype" not in direct
    gathered = _calls(FuseAttentionEpilogue()(OneQueryAttention(16)(_module(masked=True))))  # (no mask there)
    assert "gathered_scores" in gathered and "relax.add" in gathered and "gathered_context_to_int8_0" in gathered
    shared = _calls(FuseAttentionEpilogue()(OneQueryAttention(16)(_module(shared=True))))
    assert "gathered_scores" in shared and "relax.astype" in shared and "gathered_context_to_int8_0" in shared


def _numpy(inputs: list[np.ndarray], direct: bool) -> list[np.ndarray]:
    if direct:
        keys, values, q, p, mask = inputs
        keys, values = (x.reshape(-1, x.shape[2], D) for x in (keys, values))
    else:
        rows, index, past, new, q, p = inputs
        keys = values = np.where(past, rows[index], new).reshape(-1, index.shape[2], D)
    b = q.shape[0] // H
    sums = np.einsum("xd,xtd->xt", q[:, 0].astype(np.int64), keys.astype(np.int64))
    scores = sums.reshape(b, H, 1, -1).astype(np.float32) * np.float32(SCALE) + (mask if direct else 0)
    context = np.einsum("xt,xtd->xd", p[:, 0].astype(np.int64), values.astype(np.int64))
    merged = context.reshape(b, 1, H * D)
    return [scores, np.clip((merged * MULTIPLIER + (1 << (SHIFT - 1))) >> SHIFT, -127, 127).astype(np.int8)]


@pytest.mark.parametrize("direct", [False, True], ids=["gathered", "direct-masked"])
def test_fused_kernels_equal_the_unfused_graph_and_numpy(direct):
    target = tvm.target.Target(HOST_PRESET.target)
    one_query = OneQueryAttention(16)(_module(direct, masked=direct))
    vms = [relax.VirtualMachine(tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target)), tvm.cpu())
           for mod in (FuseAttentionEpilogue()(one_query), one_query)]
    for b, t in ((1, 1), (3, 7), (5, 20)):
        if direct:
            inputs = [RNG.integers(-127, 128, (b, H, t, D)).astype(np.int8) for _ in range(2)]
        else:
            stored = 1 + b * t
            hist = RNG.integers(1, stored, (b, t))
            hist[:, -1] = 0  # the step's own position: the new key
            index = (hist[:, None, :] * H + np.arange(H)[None, :, None]).astype(np.int64)
            inputs = [RNG.integers(-127, 128, (stored * H, D)).astype(np.int8), index, (hist > 0)[:, None, :, None],
                      RNG.integers(-127, 128, (b, H, 1, D)).astype(np.int8)]
        inputs += [RNG.integers(-127, 128, (b * H, 1, D)).astype(np.int8),
                   RNG.integers(0, 128, (b * H, 1, t)).astype(np.int8)]
        if direct:
            inputs.append(np.where(RNG.random((b, 1, 1, t)) < 0.2, -1e9, 0).astype(np.float32))
        fused, unfused = ([o.numpy() for o in vm["main"](*(tvm.runtime.tensor(x) for x in inputs))] for vm in vms)
        for got, same, expected in zip(fused, unfused, _numpy(inputs, direct)):
            np.testing.assert_array_equal(got, same)
            if got.dtype == np.int8:
                np.testing.assert_array_equal(got, expected)
            else:  # (a multiply-add may round once, as one fused instruction)
                np.testing.assert_allclose(got, expected, rtol=1e-6)
