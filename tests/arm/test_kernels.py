"""The int8 kernels of every ARM preset, cross-compiled here and run on an emulated aarch64 CPU of that preset:
the dense kernel (dynamic rows below, at and above the few-rows branch's bound, static rows, N and K not
multiples of the intrinsic's block) and the batched attention matmul (dynamic sizes, one query row) equal NumPy's
integer matmuls exactly, and their code holds the preset's instruction; the float32 dense kernel of FP32 layers
(``fmla``) equals NumPy's float matmul to rounding."""
import json
from pathlib import Path

import numpy as np
import pytest
import tvm

from int8mt.compiler.cross import library_linker
from int8mt.schedules.int8_batch_matmul import scheduled_int8_batch_matmul
from int8mt.schedules.int8_dense import DenseTiles, default_tiles, pack_weight, scheduled_int8_dense
from int8mt.schedules.intrin import batch_dot, dense_dot, int8_dot
from int8mt.targets import PRESETS

from ..schedules.test_int8_batch_matmul import CASES as BATCH_CASES
from .emulation import CPUS, count_instructions, needs_emulation, run_aarch64

ARM_PRESETS = [pytest.param(p, id=p.name) for p in PRESETS.values() if p.arch == "aarch64"]
INSTRUCTIONS = {"smmla": ("smmla",), "sdot": ("sdot",), "neon": ("smull", "sadalp")}
DENSE_CASES = [(64, 32, DenseTiles(4, 2, 4)), (48, 64, DenseTiles(8, 3, 16, row_split=2)), (100, 30, None),
               (16, 4, DenseTiles(2, 1, 1, row_split=2)), (256, 256, DenseTiles(6, 4, 8, row_split=2)),
               (96, 64, DenseTiles(3, 2, 8))]
FLOAT_CASES = [(64, 32, None), (100, 30, DenseTiles(6, 5, 10))]
ROWS = (1, 2, 3, 5, 6, 7, 8, 9, 25, 37)  # below and at the few-rows branch's bound (rows tile - 1), and above
STATIC_ROWS = 32
RUNNER = Path(__file__).with_name("run_kernels.py")


def _fit(tiles: DenseTiles | None, n: int, k: int, family: str) -> DenseTiles:
    """``tiles`` for ``family``: default tiles where None; row tiles rounded up to the instruction's rows, columns
    and depth cut down to divisors of the padded weight's blocks."""
    dot = int8_dot(family)
    tiles = tiles or default_tiles(n, k, dot)
    groups, blocks = -(-n // dot.lanes), -(-k // dot.reduce)
    return DenseTiles(rows=-(-tiles.rows // dot.rows) * dot.rows,
                      cols=max(c for c in range(1, tiles.cols + 1) if groups % c == 0),
                      depth=max(d for d in range(1, tiles.depth + 1) if blocks % d == 0), row_split=tiles.row_split)


@needs_emulation
@pytest.mark.parametrize("preset", ARM_PRESETS)
def test_kernels_equal_numpy_on_the_emulated_cpu(preset, tmp_path):
    dot, attention = int8_dot(preset.int8_dot), batch_dot(preset.int8_dot)
    rng = np.random.default_rng(0)
    functions, jobs, expected = {}, [], []

    def call(function: str, args: list[np.ndarray], result: np.ndarray) -> None:
        inputs, out = tmp_path / f"in{len(jobs)}.npz", tmp_path / f"out{len(jobs)}.npz"
        np.savez(inputs, *args, np.zeros(result.shape, result.dtype))
        jobs.append({"library": str(tmp_path / "kernels.so"), "function": function, "inputs": str(inputs),
                     "outputs": [len(args)], "result": str(out)})
        expected.append(result)

    for index, (n, k, tiles) in enumerate(DENSE_CASES):
        w = rng.integers(-128, 128, (n, k), dtype=np.int8)
        packed, correction = pack_weight(w, dot)
        for rows in (None, STATIC_ROWS):
            name = f"dense{index}_{'dynamic' if rows is None else rows}"
            functions[name] = scheduled_int8_dense(n, k, _fit(tiles, n, k, dot.family), dot, rows)
            for m in ROWS if rows is None else (rows,):
                a = rng.integers(-128, 128, (m, k), dtype=np.int8)
                call(name, [a, packed, correction], a.astype(np.int32) @ w.T.astype(np.int32))
    for index, (static, runs) in enumerate(BATCH_CASES):
        name = f"batch_matmul{index}"
        functions[name] = scheduled_int8_batch_matmul(*static, dot=attention)
        for batch, rows, cols, depth in runs:
            a = rng.integers(-128, 128, (batch, rows, depth), dtype=np.int8)
            b = rng.integers(-128, 128, (batch, depth, cols), dtype=np.int8)
            call(name, [a, b], a.astype(np.int32) @ b.astype(np.int32))

    float_dot = dense_dot(preset.float_dot)
    for index, (n, k, tiles) in enumerate(FLOAT_CASES):
        w = rng.standard_normal((n, k)).astype(np.float32)
        name = f"float_dense{index}"
        functions[name] = scheduled_int8_dense(n, k, tiles or default_tiles(n, k, float_dot), float_dot)
        for m in ROWS:
            a = rng.standard_normal((m, k)).astype(np.float32)
            call(name, [a, *pack_weight(w, float_dot)], a @ w.T)

    module = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in functions.items()})
    library = tmp_path / "kernels.so"
    tvm.compile(module, target=tvm.target.Target(preset.target)).export_library(
        str(library), fcompile=library_linker(preset))
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    done = run_aarch64([str(RUNNER), str(tmp_path / "jobs.json")], cpu=CPUS[preset.name])
    assert done.returncode == 0, done.stderr[-3000:]
    for job, result in zip(jobs, expected):
        got = np.load(job["result"])["arr_0"]
        if result.dtype == np.float32:
            np.testing.assert_allclose(got, result, rtol=1e-5, atol=1e-5, err_msg=job["function"])
        else:
            np.testing.assert_array_equal(got, result, err_msg=job["function"])

    assert count_instructions(library, ("fmla",))["fmla"] > 0
    counts = count_instructions(library, INSTRUCTIONS[dot.family] + INSTRUCTIONS[attention.family])
    assert all(counts[m] > 0 for m in INSTRUCTIONS[dot.family] + INSTRUCTIONS[attention.family]), counts
    if dot.family != "smmla":
        assert count_instructions(library, ("smmla",))["smmla"] == 0
