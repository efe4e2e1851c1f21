"""The VNNI int8 dense kernel: weight packing, the tiles a tuning trace encodes, and every scheduled kernel
equal to NumPy's integer matmul for dynamic row counts (tails and padded N/K included)."""
import numpy as np
import pytest
import tvm
from tvm import s_tir

from int8mt.schedules.int8_dense import (DenseTiles, default_tiles, int8_dense, pack_weight, schedule_int8_dense,
                                         scheduled_int8_dense, tiles_from_trace)

from ..conftest import VNNI, needs_vnni


def test_pack_weight_layout_and_correction():
    w = np.random.default_rng(0).integers(-128, 128, (20, 6), dtype=np.int8)
    packed, correction = pack_weight(w)
    assert packed.shape == (2, 2, 16, 4) and correction.shape == (32,)
    for n, k in [(0, 0), (17, 5), (19, 3), (3, 4)]:
        assert packed[n // 16, k // 4, n % 16, k % 4] == w[n, k]
    assert not packed[1, :, 4:, :].any() and not packed[:, 1, :, 2:].any()  # zero padding
    np.testing.assert_array_equal(correction[:20], -128 * w.astype(np.int32).sum(1))
    with pytest.raises(ValueError, match="2-D int8"):
        pack_weight(w.astype(np.int16))


def test_tiles_that_do_not_divide_the_weight_are_rejected():
    with pytest.raises(ValueError, match="cols must divide 4"):
        scheduled_int8_dense(64, 32, DenseTiles(rows=4, cols=3, depth=1))
    with pytest.raises(ValueError, match="rows must be one of"):
        scheduled_int8_dense(64, 32, DenseTiles(rows=3, cols=1, depth=1))


@pytest.mark.parametrize("seed", range(4))
def test_sampled_trace_gives_back_its_tiles(seed):
    sch = s_tir.Schedule(int8_dense(256, 1024, 32), seed=seed + 1)
    schedule_int8_dense(sch, None)
    tiles = tiles_from_trace(sch.trace)
    assert 16 % tiles.cols == 0 and 256 % tiles.depth == 0 and tiles.rows in (1, 2, 4, 8)
    replay = s_tir.Schedule(int8_dense(256, 1024, 32))
    schedule_int8_dense(replay, tiles)
    tvm.ir.assert_structural_equal(replay.mod, sch.mod)


@needs_vnni
@pytest.mark.parametrize("n,k,tiles", [(64, 32, DenseTiles(4, 2, 4)), (48, 64, DenseTiles(8, 3, 16)),
                                       (100, 30, None), (16, 4, DenseTiles(1, 1, 1)), (256, 256, DenseTiles(2, 4, 64))])
def test_kernel_equals_numpy_for_any_row_count(n, k, tiles):
    rng = np.random.default_rng(n + k)
    w = rng.integers(-128, 128, (n, k), dtype=np.int8)
    packed, correction = pack_weight(w)
    kernel = scheduled_int8_dense(n, k, tiles or default_tiles(n, k))
    module = tvm.compile(tvm.IRModule({"main": kernel}), target=tvm.target.Target(VNNI.target)).mod
    for rows in (1, 3, 8, 9, 37):
        a = rng.integers(-128, 128, (rows, k), dtype=np.int8)
        out = tvm.runtime.tensor(np.zeros((rows, n), np.int32))
        module["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(packed), tvm.runtime.tensor(correction), out)
        np.testing.assert_array_equal(out.numpy(), a.astype(np.int32) @ w.T.astype(np.int32))


@needs_vnni
def test_peak_microbenchmark_runs_every_thread():
    from int8mt.schedules.vnni_peak import measure_vnni_peak

    result = measure_vnni_peak(tvm.target.Target(VNNI.target), iters=1000, repeat=1)
    assert result["threads"] >= 1 and result["gops"] > 0
