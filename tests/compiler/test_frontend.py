"""Relax import of the entry points against PyTorch, on several dynamic shapes."""
import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from int8mt.compiler.frontend import export_to_relax
from int8mt.compiler.pipeline import relax_pipeline

from ..conftest import HOST_PRESET

TARGET = tvm.target.Target(HOST_PRESET.target)


@pytest.fixture(scope="module")
def vm(tiny_model):
    mod = export_to_relax(tiny_model)
    assert {gv.name_hint for gv in mod.get_global_vars()} == {"encode", "decode_step", "reorder_cache", "top_candidates"}
    return relax.VirtualMachine(tvm.compile(mod, TARGET, relax_pipeline=relax_pipeline(TARGET)), tvm.cpu())


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
    """Teacher forcing through the compiled steps reproduces the model's logits; halfway, the hypotheses are put
    in a new order by reordering only ``history``'s rows (and the cross-attention rows), as beam search does."""
    src = _src(batch, length, seed=length)
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(4, 8000, (batch, steps), generator=g)
    with torch.no_grad():
        cross = tiny_model.cross_kv(tiny_model.encode(src))
        full = tiny_model(src, tokens)  # teacher forcing: the step outputs must reproduce it
    (cache_rows,), history = tiny_model.empty_cache(batch)
    (cross,) = cross
    order = np.arange(batch)
    for t in range(steps):
        if t == steps // 2:  # e.g. [0, 1, 2, 3] -> [3, 0, 1, 2]
            order, rows = np.roll(order, 1), np.roll(np.arange(batch), 1)
            history, cross = history[rows], cross[:, :, rows]
        logits, *new_kv = vm["decode_step"](*(tvm.runtime.tensor(np.ascontiguousarray(a)) for a in (
            tokens[order, t:t + 1].numpy(), np.array([t]), cache_rows.numpy(), history.numpy(), cross.numpy(),
            src[order].numpy())))
        assert len(new_kv) == 2 * tiny_model.cfg.decoder_layers
        (cache_rows,), history = tiny_model.append_rows((cache_rows,), history,
                                                        tuple(torch.from_numpy(k.numpy()) for k in new_kv))
        np.testing.assert_allclose(logits.numpy(), full[order, t].numpy(), atol=1e-4, rtol=0)


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
