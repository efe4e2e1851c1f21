"""The int8 dense kernel of x86-amx: what it compiles to (on any x86 machine), which rows run on AMX tiles, and,
on a CPU with AMX, its results against NumPy's integer matmul around the tile sizes, with padded N and K."""
import numpy as np
import pytest
import tvm

from int8mt.schedules.amx_dense import MIN_ROWS
from int8mt.schedules.int8_dense import DenseTiles, default_tiles, pack_weight, scheduled_int8_dense
from int8mt.schedules.intrin import int8_dot
from int8mt.targets import get_preset

from ..conftest import runnable

AMX = get_preset("x86-amx")
DOT = int8_dot("amx")


def test_weights_are_packed_in_whole_tiles_of_k():
    packed, correction = pack_weight(np.ones((20, 70), np.int8), DOT)
    assert packed.shape == (2, 32, 16, 4) and correction.shape == (32,)  # K 70 -> 128, N 20 -> 32
    assert (correction[:20] == -128 * 70).all() and (correction[20:] == 0).all()


def test_kernel_compiles_to_tile_instructions_and_vnni_for_few_rows():
    """LLVM emits the tile code on any x86 machine (running it needs AMX)."""
    kernel = scheduled_int8_dense(256, 256, default_tiles(256, 256, DOT), DOT)
    library = tvm.compile(tvm.IRModule({"main": kernel}), target=tvm.target.Target(AMX.target))
    asm = library.mod.inspect_source("asm")
    for instruction in ("ldtilecfg", "tilezero", "tileloadd", "tdpbusd", "tilestored", "tilerelease", "vpdpbusd"):
        assert instruction in asm, instruction


@pytest.mark.parametrize("rows,tiles,dot_product", [(None, True, True), (MIN_ROWS, True, False),
                                                    (MIN_ROWS - 1, False, True)])
def test_rows_from_a_tile_run_on_tiles_fewer_on_vnni(rows, tiles, dot_product):
    script = scheduled_int8_dense(64, 64, DenseTiles(4, 2, 4), DOT, rows).script()
    assert ('"llvm.x86.tdpbusd"' in script) == tiles
    assert ("llvm.x86.avx512.vpdpbusd.512" in script) == dot_product
    assert (f"if m >= T.int64({MIN_ROWS}):" in script) == (rows is None)


@pytest.mark.parametrize("preset", [runnable(AMX)])
@pytest.mark.parametrize("n,k", [(64, 64), (100, 30), (48, 200), (512, 256)])
def test_kernel_equals_numpy_around_the_tile_sizes(n, k, preset):
    """Odd numbers of 16-column tiles (one per block), K padded to 64, rows around 8, 16 and 32 (blocks of two
    16-row tiles), all on every thread of the pool."""
    rng = np.random.default_rng(n * k)
    w = rng.integers(-128, 128, (n, k), dtype=np.int8)
    packed, correction = pack_weight(w, DOT)
    kernel = scheduled_int8_dense(n, k, default_tiles(n, k, DOT), DOT)
    module = tvm.compile(tvm.IRModule({"main": kernel}), target=tvm.target.Target(preset.target)).mod
    for rows in (1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 64, 100, 257):
        a = rng.integers(-128, 128, (rows, k), dtype=np.int8)
        out = tvm.runtime.tensor(np.zeros((rows, n), np.int32))
        module["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(packed), tvm.runtime.tensor(correction), out)
        np.testing.assert_array_equal(out.numpy(), a.astype(np.int32) @ w.T.astype(np.int32))
