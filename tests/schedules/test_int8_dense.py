"""The int8 dense kernel of every dot-product family: weight packing, the tiles a tuning trace encodes, and
every scheduled kernel equal to NumPy's integer matmul for dynamic row counts (tails, the few-rows branch and
padded N/K included), and the peak microbenchmark; the float32 dense kernel of FP32 layers against NumPy."""
import numpy as np
import pytest
import tvm
from tvm import s_tir

from int8mt.schedules.int8_dense import (MAX_COLS, DenseTiles, default_tiles, fits_registers, int8_dense,
                                         live_registers, pack_weight, row_tiles, schedule_int8_dense,
                                         scheduled_int8_dense, tiles_from_trace)
from int8mt.schedules.intrin import DOTS, FLOAT_DOTS, dense_dot, int8_dot

from ..conftest import FLOAT_PRESETS, INT8_PRESETS


def test_pack_weight_layout_and_correction():
    w = np.random.default_rng(0).integers(-128, 128, (20, 6), dtype=np.int8)
    packed, correction = pack_weight(w, DOTS["vnni"])
    assert packed.shape == (2, 2, 16, 4) and correction.shape == (32,)
    for n, k in [(0, 0), (17, 5), (19, 3), (3, 4)]:
        assert packed[n // 16, k // 4, n % 16, k % 4] == w[n, k]
    assert not packed[1, :, 4:, :].any() and not packed[:, 1, :, 2:].any()  # zero padding
    np.testing.assert_array_equal(correction[:20], -128 * w.astype(np.int32).sum(1))
    with pytest.raises(ValueError, match="2-D int8"):
        pack_weight(w.astype(np.int16), DOTS["vnni"])


def test_pack_weight_for_the_int16_families():
    w = np.random.default_rng(0).integers(-128, 128, (20, 5), dtype=np.int8)
    packed, correction = pack_weight(w, DOTS["avx2"])
    assert packed.shape == (3, 3, 8, 2) and not correction.any()  # signed activations: no correction
    for n, k in [(0, 0), (17, 4), (19, 3), (9, 1)]:
        assert packed[n // 8, k // 2, n % 8, k % 2] == w[n, k]
    assert pack_weight(w, DOTS["avx512bw"])[0].shape == (2, 3, 16, 2)
    with pytest.raises(ValueError, match="no int8 dot-product intrinsic .sse2.; known: amx, vnni, avx512bw, avx2, smmla, sdot, neon"):
        int8_dot("sse2")


def test_tiles_that_do_not_divide_the_weight_are_rejected():
    with pytest.raises(ValueError, match="cols must divide 4"):
        scheduled_int8_dense(64, 32, DenseTiles(rows=4, cols=3, depth=1), DOTS["vnni"])
    with pytest.raises(ValueError, match="rows must be one of"):
        scheduled_int8_dense(64, 32, DenseTiles(rows=5, cols=1, depth=1), DOTS["vnni"])
    with pytest.raises(ValueError, match="row_split one of"):
        scheduled_int8_dense(64, 32, DenseTiles(rows=4, cols=1, depth=1, row_split=3), DOTS["vnni"])


@pytest.mark.parametrize("family,rows,cols,registers", [
    ("avx2", 6, 2, 16), ("avx2", 4, 2, 12), ("avx2", 8, 1, 11), ("avx2", 1, 8, 11),  # fit AVX2's 16
    ("avx2", 8, 2, 20), ("avx2", 4, 4, 22), ("avx2", 3, 4, 18), ("avx2", 2, 5, 17),  # spill (measured slower)
    ("vnni", 6, 4, 29), ("vnni", 4, 5, 26), ("vnni", 8, 4, 37), ("vnni", 6, 5, 36), ("vnni", 4, 8, 41),
    ("avx512bw", 6, 4, 30), ("fp32-avx2", 4, 3, 16),
    ("smmla", 4, 4, 14), ("smmla", 2, 8, 10), ("smmla", 8, 8, 44),  # 2-row instructions: a register per 2 rows
])
def test_live_registers_of_a_register_tile(family, rows, cols, registers):
    """Accumulators + weights (streamed by a one-row-group tile) + activations + vpmaddwd's products."""
    dot = dense_dot(family)
    assert live_registers(rows, cols, dot) == registers
    assert fits_registers(DenseTiles(rows, cols, 1), dot) == (registers <= dot.vector_registers)


@pytest.mark.parametrize("family", [f for f, dot in DOTS.items() if not dot.amx_tiles])
def test_default_and_few_rows_tiles_fit_the_registers(family):
    dot = DOTS[family]
    assert fits_registers(default_tiles(8000, 256, dot), dot)
    assert fits_registers(DenseTiles(dot.rows, min(MAX_COLS, dot.vector_registers // 2), 1), dot)  # few rows


@pytest.mark.parametrize("family", [f for f, dot in DOTS.items() if not dot.amx_tiles])  # (AMX: no tuning space)
@pytest.mark.parametrize("seed", range(3))
def test_sampled_trace_gives_back_its_tiles(seed, family):
    dot = DOTS[family]
    sch = s_tir.Schedule(int8_dense(256, 1024, 32, dot), seed=seed + 1)
    schedule_int8_dense(sch, None, dot)
    tiles = tiles_from_trace(sch.trace, dot)
    assert (256 // dot.lanes) % tiles.cols == 0 and (1024 // dot.reduce) % tiles.depth == 0
    assert tiles.rows in row_tiles(dot) and tiles.rows % dot.rows == 0
    replay = s_tir.Schedule(int8_dense(256, 1024, 32, dot))
    schedule_int8_dense(replay, tiles, dot)
    tvm.ir.assert_structural_equal(replay.mod, sch.mod)


@pytest.mark.parametrize("preset", INT8_PRESETS)
@pytest.mark.parametrize("n,k,tiles", [(64, 32, DenseTiles(4, 2, 4)), (48, 64, DenseTiles(8, 3, 16, row_split=2)),
                                       (100, 30, None), (16, 4, DenseTiles(1, 1, 1, row_split=2)),
                                       (256, 256, DenseTiles(6, 4, 64, row_split=2)), (96, 64, DenseTiles(3, 2, 8))])
def test_kernel_equals_numpy_for_any_row_count(n, k, tiles, preset):
    dot = int8_dot(preset.int8_dot)
    rng = np.random.default_rng(n + k)
    w = rng.integers(-128, 128, (n, k), dtype=np.int8)
    packed, correction = pack_weight(w, dot)
    kernel = scheduled_int8_dense(n, k, tiles or default_tiles(n, k, dot), dot)
    module = tvm.compile(tvm.IRModule({"main": kernel}), target=tvm.target.Target(preset.target)).mod
    for rows in (1, 2, 3, 5, 6, 7, 8, 9, 25, 37):  # below and at the few-rows branch's bound (rows tile - 1)
        a = rng.integers(-128, 128, (rows, k), dtype=np.int8)
        out = tvm.runtime.tensor(np.zeros((rows, n), np.int32))
        module["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(packed), tvm.runtime.tensor(correction), out)
        np.testing.assert_array_equal(out.numpy(), a.astype(np.int32) @ w.T.astype(np.int32))


@pytest.mark.parametrize("rows,tiles,few", [(None, DenseTiles(8, 2, 4), 7), (None, DenseTiles(2, 2, 4), 1),
                                            (None, DenseTiles(1, 2, 4), 0), (32, DenseTiles(8, 2, 4), 0)])
def test_few_rows_branch_only_for_dynamic_rows_and_row_tiles_above_one(rows, tiles, few):
    """A kernel with dynamic rows and a row tile of r >= 2 computes m < r rows one at a time (its own block
    pair under ``if m <= r - 1``); static-row kernels (the tuning workloads) keep the single block."""
    script = scheduled_int8_dense(64, 32, tiles, int8_dot("avx2"), rows).script()
    assert ('sblock("dense_few_update_o")' in script) == bool(few)
    assert (f"if m <= T.int64({few}):" in script) == bool(few)


@pytest.mark.parametrize("preset", INT8_PRESETS)
def test_peak_microbenchmark_runs_every_thread(preset):
    from int8mt.schedules.int8_peak import AMX_INSTRUCTION, measure_int8_peak

    dot = int8_dot(preset.int8_dot)
    result = measure_int8_peak(dot, tvm.target.Target(preset.target), iters=1000, repeat=1)
    assert result["threads"] >= 1 and result["gops"] > 0
    assert result["instruction"] == (AMX_INSTRUCTION if dot.amx_tiles else dot.instruction)


def test_pack_weight_float():
    w = np.random.default_rng(0).standard_normal((20, 5)).astype(np.float32)
    packed, correction = pack_weight(w, FLOAT_DOTS["fp32-avx2"])
    assert packed.shape == (3, 5, 8, 1) and packed.dtype == np.float32
    assert correction.dtype == np.float32 and not correction.any()
    for n, k in [(0, 0), (17, 4), (19, 3), (9, 1)]:
        assert packed[n // 8, k, n % 8, 0] == w[n, k]
    assert not packed[2, :, 4:].any()  # N padded with zeros
    with pytest.raises(ValueError, match="2-D float32 weight"):
        pack_weight(w.astype(np.int8), FLOAT_DOTS["fp32-avx2"])


@pytest.mark.parametrize("preset", FLOAT_PRESETS)
@pytest.mark.parametrize("n,k,tiles", [(64, 32, None), (100, 30, None), (48, 64, DenseTiles(6, 1, 16, row_split=2)),
                                       (64, 64, DenseTiles(6, 2, 16, row_split=2)), (16, 8, DenseTiles(1, 1, 1))])
def test_float_kernel_equals_numpy_for_any_row_count(n, k, tiles, preset):
    """The float32 kernel (vectorized multiply-adds, no intrinsic) with dynamic rows, tails and the few-rows
    branch; float sums in another order than NumPy's: equal to rounding. The explicit tiles fit 8 and 16 lanes."""
    dot = dense_dot(preset.float_dot)
    rng = np.random.default_rng(n + k)
    w = rng.standard_normal((n, k)).astype(np.float32)
    packed, correction = pack_weight(w, dot)
    kernel = scheduled_int8_dense(n, k, tiles or default_tiles(n, k, dot), dot)
    assert kernel.attrs["int8mt.kernel"] == "float_dense"
    module = tvm.compile(tvm.IRModule({"main": kernel}), target=tvm.target.Target(preset.target)).mod
    for rows in (1, 2, 3, 5, 7, 9, 25, 37):
        a = rng.standard_normal((rows, k)).astype(np.float32)
        out = tvm.runtime.tensor(np.zeros((rows, n), np.float32))
        module["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(packed), tvm.runtime.tensor(correction), out)
        np.testing.assert_allclose(out.numpy(), a @ w.T, rtol=1e-5, atol=1e-5)
