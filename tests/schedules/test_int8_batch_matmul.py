"""The batched int8 matmul of attention (operands packed at run time), for every dot-product family this CPU
runs: equal to NumPy's integer batched matmul for static and dynamic sizes, tails of the intrinsic's blocks
(keys not a multiple of 16, reductions not a multiple of 4) and a single query row (a decoder step); x86-amx's
kernel compiles to tile code on any x86 machine."""
import numpy as np
import pytest
import tvm

from int8mt.schedules.int8_batch_matmul import scheduled_int8_batch_matmul
from int8mt.schedules.intrin import batch_dot

from int8mt.targets import get_preset

from ..conftest import INT8_PRESETS

# (static sizes the kernel is built for: batch, rows, cols, depth; None = dynamic), then the sizes it runs
CASES = [
    ((None, None, None, 64), [(3, 20, 20, 64), (2, 1, 7, 64), (5, 9, 33, 64)]),  # QK^T in the encoder
    ((None, None, 64, None), [(3, 20, 64, 20), (2, 5, 64, 3), (1, 17, 64, 41)]),  # softmax.V
    ((None, 1, None, 64), [(4, 1, 1, 64), (6, 1, 18, 64)]),  # a decoder step's QK^T
    ((None, 1, 64, None), [(4, 1, 64, 1), (6, 1, 64, 18)]),  # a decoder step's softmax.V
    ((2, 5, 24, 12), [(2, 5, 24, 12)]),  # all static
]


@pytest.mark.parametrize("preset", INT8_PRESETS)
@pytest.mark.parametrize("static,runs", CASES)
def test_batch_matmul_equals_numpy(static, runs, preset):
    dot = batch_dot(preset.int8_dot)
    kernel = scheduled_int8_batch_matmul(*static, dot=dot)
    module = tvm.compile(tvm.IRModule({"main": kernel}), target=tvm.target.Target(preset.target)).mod
    rng = np.random.default_rng(len(runs))
    for batch, rows, cols, depth in runs:
        a = rng.integers(-128, 128, (batch, rows, depth), dtype=np.int8)
        b = rng.integers(-128, 128, (batch, depth, cols), dtype=np.int8)
        out = tvm.runtime.tensor(np.zeros((batch, rows, cols), np.int32))
        module["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b), out)
        np.testing.assert_array_equal(out.numpy(), a.astype(np.int32) @ b.astype(np.int32))


def test_amx_kernel_compiles_to_signed_tile_products():
    """x86-amx's batched kernel multiplies signed bytes on tiles (``tdpbssd``), no VNNI shift (running it needs
    AMX: the cases above, on such a CPU)."""
    amx = get_preset("x86-amx")
    kernel = scheduled_int8_batch_matmul(None, None, None, 64, batch_dot(amx.int8_dot))
    asm = tvm.compile(tvm.IRModule({"main": kernel}), target=tvm.target.Target(amx.target)).mod.inspect_source("asm")
    for instruction in ("ldtilecfg", "tilezero", "tileloadd", "tdpbssd", "tilestored", "tilerelease"):
        assert instruction in asm, instruction
    assert "vpdpbusd" not in asm
