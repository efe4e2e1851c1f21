"""CUDAInt8Matmul's tensor-core kernels without a GPU: their CUDA C run on this CPU (tests/cuda_emulation.py: ``wmma``
fragments, ``cp.async`` copies, two-dimensional thread blocks) equals NumPy exactly, for the tiles the rule builds
(the portable tile, the sm_80+ default, a deeper pipeline; with ``-m extended`` every tile the tile search tries,
the shipped table's among them), linear layers at row counts that leave a tile's rows padded (1, 7) or span several
row tiles (100, 130), with the fused dequantization and requantization epilogues, the kernel of few rows that a
linear layer of dynamic rows launches up to 32 rows, and the batched attention products (dynamic positions; the
context product's K padded and strided)."""
import re
import shutil

import numpy as np
import pytest
import tvm
from tvm import te, tirx, topi
from tvm.s_tir import dlight

from int8mt.compiler.cuda import cuda_compiled_here, cuda_source

from int8mt.schedules.cuda_int8_matmul import FEW_ROWS_TILE, PORTABLE_TILE, CUDAInt8Matmul, MatmulTile, default_tile
from int8mt.schedules.cuda_tiles import CANDIDATES, CHECKED_ROWS, FEW_ROWS_CANDIDATES, FEW_TILE_ROWS, shipped_tiles
from int8mt.targets import get_preset

from ..conftest import HOST_PRESET
from ..cuda_emulation import emulated_kernel, kernel_cuda_source

pytestmark = pytest.mark.skipif(shutil.which("g++") is None,
                                reason="runs the kernels' CUDA C on this CPU with g++ (Debian: apt-get install g++)")

TILES = {"portable": PORTABLE_TILE, "default sm_90": default_tile("sm_90"), "few rows": FEW_ROWS_TILE,
         "four stages": MatmulTile(warps_m=2, warps_n=4, frags_m=2, frags_n=2, k_frags=4, vector=16, stages=4)}
RNG = np.random.default_rng(3)


def _int8(*shape: int) -> np.ndarray:
    return RNG.integers(-128, 128, shape).astype(np.int8)


def _i64(*dims) -> tuple:
    """Static dimensions as int64, as Relax's legalized shapes have them (a dynamic one is int64)."""
    return tuple(tirx.const(d, "int64") if isinstance(d, int) else d for d in dims)


def _product(a: te.Tensor, b: te.Tensor, transposed: bool) -> te.Tensor:
    """``a @ b^T`` (``transposed``) or ``a @ b`` in int32, batched over a leading axis where ``a`` has one."""
    k = a.shape[-1]
    r = te.reduce_axis(_i64(0, k), "r")
    if len(a.shape) == 2:
        return te.compute(_i64(a.shape[0], b.shape[0]), lambda i, j: te.sum(
            a[i, r].astype("int32") * b[j, r].astype("int32"), axis=r), name="acc")
    n = b.shape[1] if transposed else b.shape[2]
    return te.compute(_i64(a.shape[0], a.shape[1], n), lambda h, i, j: te.sum(
        a[h, i, r].astype("int32") * (b[h, j, r] if transposed else b[h, r, j]).astype("int32"), axis=r), name="acc")


def _linear(k: int, n: int, epilogue: str | None) -> tvm.tirx.PrimFunc:
    """A linear layer ``x[rows, k] @ w[n, k]^T`` (``rows`` dynamic) with ``epilogue``: none (int32), "dequantize"
    (``acc * xs[i] * ws[j] + bias[j]``, float32: run-time ranges), "swish" (that times its sigmoid as the pipeline
    legalizes it: OPUS-MT's FFN) or "requantize" (``clip((acc + b[j]) * m[j] >> s[j], -127, 127)`` to int8: static
    ranges)."""
    rows = tirx.Var("rows", "int64")
    x, w = te.placeholder(_i64(rows, k), "int8", "x"), te.placeholder(_i64(n, k), "int8", "w")
    acc = _product(x, w, transposed=True)
    if epilogue is None:
        return te.create_prim_func([x, w, acc])
    if epilogue in ("dequantize", "swish"):
        xs, ws, bias = (te.placeholder(_i64(*shape), "float32", name) for shape, name in
                        (((rows, 1), "xs"), ((n,), "ws"), ((n,), "bias")))
        out = te.compute(_i64(rows, n), lambda i, j: acc[i, j].astype("float32") * (xs[i, 0] * ws[j]) + bias[j],
                         name="out" if epilogue == "dequantize" else "y")
        if epilogue == "swish":
            out = topi.multiply(out, topi.divide(1.0, topi.add(1.0, topi.fast_exp(topi.negative(out)))))
            out = te.compute(out.shape, lambda i, j: out[i, j], name="out")
        return te.create_prim_func([x, w, xs, ws, bias, out])
    b, m, s = (te.placeholder(_i64(n), dtype, name) for dtype, name in (("int32", "b"), ("int64", "m"), ("int64", "s")))
    out = te.compute(_i64(rows, n), lambda i, j: te.max(te.min(
        ((acc[i, j] + b[j]).astype("int64") * m[j]) >> s[j], tirx.const(127, "int64")), tirx.const(-127, "int64")
    ).astype("int8"), name="out")
    return te.create_prim_func([x, w, b, m, s, out])


def _emulated(func: tvm.tirx.PrimFunc, tile: MatmulTile, preset: str, tmp_path):
    """``func`` scheduled by CUDAInt8Matmul on ``tile`` for ``preset``, its kernel run on this CPU, with the
    tile's thread block (a warp along x, the warps along y)."""
    source = kernel_cuda_source(func, "matmul", CUDAInt8Matmul(tile=tile), preset)
    assert "wmma::mma_sync" in source
    return emulated_kernel(source, "matmul_kernel", tmp_path, block=(32, tile.warps_m * tile.warps_n))


def _grid(tile: MatmulTile, rows: int, columns: int, batch: int = 1) -> tuple[int, int, int]:
    tile_rows, tile_columns, _ = tile.shape
    return -(-columns // tile_columns), -(-rows // tile_rows), batch


@pytest.mark.parametrize("k,n", [(256, 768), (1024, 256)])
@pytest.mark.parametrize("name", list(TILES))
def test_a_linear_layers_kernel_run_on_this_cpu_equals_numpy(name, k, n, tmp_path):
    tile = TILES[name]
    run = _emulated(_linear(k, n, None), tile, "cuda-sm90", tmp_path)
    w = _int8(n, k)
    for rows in (1, 7, 100, 130):
        x = _int8(rows, k)
        out = np.full((rows, n), -1, np.int32)
        run(_grid(tile, rows, n), x=x, w=w, acc=out, rows=rows)
        np.testing.assert_array_equal(out, x.astype(np.int32) @ w.T.astype(np.int32), err_msg=f"{rows} rows")


@pytest.mark.extended
@pytest.mark.parametrize("spec", CANDIDATES, ids=lambda spec: MatmulTile(**spec).label)
def test_every_tile_a_search_tries_runs_on_this_cpu_as_numpy(spec, tmp_path):
    """Each candidate of the tile search (``cuda_tiles.CANDIDATES``, up to 16 warps and four stages; the shipped
    table's tiles are among them) at a linear layer whose K and N every candidate tiles (512 x 512), at the rows the
    search checks it at and over a row tile: exact, before a GPU's time goes to timing it."""
    tile = MatmulTile(**spec)
    run = _emulated(_linear(512, 512, None), tile, "cuda-sm90", tmp_path)
    w = _int8(512, 512)
    for rows in (*CHECKED_ROWS, 130):
        x = _int8(rows, 512)
        out = np.full((rows, 512), -1, np.int32)
        run(_grid(tile, rows, 512), x=x, w=w, acc=out, rows=rows)
        np.testing.assert_array_equal(out, x.astype(np.int32) @ w.T.astype(np.int32), err_msg=f"{rows} rows")


@pytest.mark.extended
@pytest.mark.parametrize("spec", FEW_ROWS_CANDIDATES, ids=lambda spec: MatmulTile(**spec).label)
def test_every_few_rows_tile_a_search_tries_runs_on_this_cpu_as_numpy(spec, tmp_path):
    """Each few-rows candidate of the tile search at the rows it is measured at and checked at."""
    tile = MatmulTile(**spec)
    run = _emulated(_linear(512, 512, None), tile, "cuda-sm90", tmp_path)
    w = _int8(512, 512)
    for rows in (*FEW_TILE_ROWS, *CHECKED_ROWS):
        x = _int8(rows, 512)
        out = np.full((rows, 512), -1, np.int32)
        run(_grid(tile, rows, 512), x=x, w=w, acc=out, rows=rows)
        np.testing.assert_array_equal(out, x.astype(np.int32) @ w.T.astype(np.int32), err_msg=f"{rows} rows")


def test_the_tiles_a_linear_layer_runs_on_with_and_without_tables():
    """What ``int8mt bench kernels`` labels a layer's kernels with: the tile and the few-rows kernel's, if any."""
    few = MatmulTile(warps_m=1, warps_n=2, frags_m=1, frags_n=2, k_frags=8, vector=16, stages=2)
    assert CUDAInt8Matmul().linear_tiles(256, 384, "sm_90") == (default_tile("sm_90"), FEW_ROWS_TILE)
    assert CUDAInt8Matmul(tuned_few_rows={(256, 384): few}).linear_tiles(256, 384, "sm_90a")[1] == few
    assert CUDAInt8Matmul(tuned={(256, 384): PORTABLE_TILE}).linear_tiles(256, 384, "sm_90") == (PORTABLE_TILE, None)
    assert CUDAInt8Matmul().linear_tiles(256, 384, "sm_75") == (PORTABLE_TILE, None)


def test_a_tuned_few_rows_tile_is_the_few_rows_kernels_tile(tmp_path):
    """The few-rows table's tile for a shape (here 16 x 64 on two warps, where the default has four) is the one the
    host launches up to 32 rows: exact on this CPU with that tile's block and grid at 1 and 32 rows."""
    tile = MatmulTile(warps_m=1, warps_n=2, frags_m=1, frags_n=2, k_frags=8, vector=16, stages=2)
    rule = CUDAInt8Matmul(tuned_few_rows={(256, 384): tile})
    source = kernel_cuda_source(_linear(256, 384, None), "matmul", rule, "cuda-sm90")
    assert "__launch_bounds__(64) matmul_kernel(" in source
    shared = set(re.findall(r"int (cse_v\d+)", source))
    run = emulated_kernel(source, "matmul_kernel", tmp_path, block=(32, tile.warps_m * tile.warps_n))
    w = _int8(384, 256)
    for rows in (1, 32):
        x = _int8(rows, 256)
        out = np.full((rows, 384), -1, np.int32)
        run(_grid(tile, rows, 384), x=x, w=w, acc=out, rows=rows, **dict.fromkeys(shared, rows))
        np.testing.assert_array_equal(out, x.astype(np.int32) @ w.T.astype(np.int32), err_msg=f"{rows} rows")


def test_the_shipped_tiles_are_among_those_the_search_tries():
    """So that ``-m extended`` checks each shipped tile on this CPU (the default run checks three)."""
    searched = {MatmulTile(**spec) for spec in CANDIDATES}
    assert set(shipped_tiles("sm_90").values()) <= searched | {PORTABLE_TILE}


def test_the_portable_tile_for_sm75_runs_on_this_cpu_as_numpy(tmp_path):
    """sm_75 has no asynchronous copies: its default, the portable tile, built for it."""
    assert default_tile("sm_75") == PORTABLE_TILE
    run = _emulated(_linear(512, 256, None), PORTABLE_TILE, "cuda-sm75", tmp_path)
    x, w = _int8(70, 512), _int8(256, 512)
    out = np.zeros((70, 256), np.int32)
    run(_grid(PORTABLE_TILE, 70, 256), x=x, w=w, acc=out, rows=70)
    np.testing.assert_array_equal(out, x.astype(np.int32) @ w.T.astype(np.int32))


def _host(func: tvm.tirx.PrimFunc, *arrays: np.ndarray) -> None:
    """``func`` compiled for this CPU, run on ``arrays`` (the last one written)."""
    tensors = [tvm.runtime.tensor(a) for a in arrays]
    tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target(HOST_PRESET.target))["main"](*tensors)
    arrays[-1][...] = tensors[-1].numpy()


@pytest.mark.parametrize("epilogue", ["dequantize", "swish", "requantize"])
@pytest.mark.parametrize("name", ["portable", "default sm_90"])
def test_a_linear_layer_with_its_epilogue_run_on_this_cpu_equals_this_cpus_kernel(epilogue, name, tmp_path):
    """The epilogue applied as the tile is written out (per-row and per-column operands, int8 or float32 stores, an
    activation):
    the same values as the function compiled for this CPU (float32 within a rounding: a multiply and an add may
    fuse)."""
    tile, k, n, rows = TILES[name], 256, 384, 130
    func = _linear(k, n, epilogue)
    run = _emulated(func, tile, "cuda-sm90", tmp_path)
    x, w = _int8(rows, k), _int8(n, k)
    if epilogue in ("dequantize", "swish"):
        operands = {"xs": RNG.uniform(0.01, 0.1, (rows, 1)).astype(np.float32),
                    "ws": RNG.uniform(0.01, 0.1, n).astype(np.float32),
                    "bias": RNG.standard_normal(n).astype(np.float32)}
        dtype = np.float32
    else:
        operands = {"b": RNG.integers(-5000, 5000, n).astype(np.int32),
                    "m": RNG.integers(1 << 14, 1 << 15, n).astype(np.int64), "s": np.full(n, 24, np.int64)}
        dtype = np.int8
    expected = np.zeros((rows, n), dtype)
    _host(func, x, w, *operands.values(), expected)
    out = np.zeros((rows, n), dtype)
    run(_grid(tile, rows, n), x=x, w=w, **operands, out=out, rows=rows)
    if dtype == np.int8:
        np.testing.assert_array_equal(out, expected)
        assert len(np.unique(expected)) > 100
    else:
        np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-5)


def test_a_linear_layer_of_dynamic_rows_launches_the_few_rows_kernel_up_to_its_rows(tmp_path):
    """With a tile of more rows than FEW_ROWS_TILE's (the sm_90 default), the function holds both schedules and its
    host code launches the few-rows kernel (the first) up to 32 rows, the other beyond; each, run on this CPU with
    its tile's grid, equals NumPy on its side of the bound, the requantization epilogue included."""
    func = _linear(256, 384, "requantize")
    preset = get_preset("cuda-sm90")
    mod = tvm.IRModule({"matmul": func.with_attr("global_symbol", "matmul")})
    with tvm.target.Target(preset.target):
        mod = dlight.ApplyDefaultSchedule(CUDAInt8Matmul())(mod)
    with cuda_compiled_here(preset.target["arch"]):
        executable = tvm.compile(mod, target=tvm.target.Target(preset.target))
    host = executable.mod.inspect_source("ll")
    assert re.search(r"icmp (slt|sgt) i64 %\w+, (33|32)\b", host), "the host's test of the rows"
    source = cuda_source(executable)
    w = _int8(384, 256)
    operands = {"b": RNG.integers(-5000, 5000, 384).astype(np.int32),
                "m": RNG.integers(1 << 14, 1 << 15, 384).astype(np.int64), "s": np.full(384, 24, np.int64)}
    # the host computes the rows' int32 copy, which both kernels' padded-row reads use, once for both
    shared = set(re.findall(r"int (cse_v\d+)", source))
    for kernel, tile, row_counts in (("matmul_kernel", FEW_ROWS_TILE, (1, 7, 32)),
                                     ("matmul_kernel_1", default_tile("sm_90"), (33, 130))):
        run = emulated_kernel(source, kernel, tmp_path, block=(32, tile.warps_m * tile.warps_n))
        for rows in row_counts:
            x = _int8(rows, 256)
            expected, out = np.zeros((rows, 384), np.int8), np.zeros((rows, 384), np.int8)
            _host(func, x, w, *operands.values(), expected)
            run(_grid(tile, rows, 384), x=x, w=w, **operands, out=out, rows=rows, **dict.fromkeys(shared, rows))
            np.testing.assert_array_equal(out, expected, err_msg=f"{kernel}, {rows} rows")


@pytest.mark.parametrize("case", ["tile of 32 rows", "portable tile", "static rows"])
def test_one_kernel_where_the_tile_has_few_rows_or_copies_4_bytes_or_the_rows_are_fixed(case):
    x, w = te.placeholder(_i64(40, 256), "int8", "x"), te.placeholder(_i64(384, 256), "int8", "w")
    func, tile = _linear(256, 384, None), {"tile of 32 rows": MatmulTile(warps_m=1, vector=16, stages=2),
                                            "portable tile": PORTABLE_TILE}.get(case, default_tile("sm_90"))
    if case == "static rows":
        func = te.create_prim_func([x, w, _product(x, w, transposed=True)])
    source = kernel_cuda_source(func, "matmul", CUDAInt8Matmul(tuned={(256, 384): tile}), "cuda-sm90")
    assert set(re.findall(r"__global__ void __launch_bounds__\(\d+\) (\w+)\(", source)) == {"matmul_kernel"}


def test_the_attention_products_run_on_this_cpu_equal_numpy(tmp_path):
    """An encoder's attention products on tensor cores, ``pairs`` (hypotheses x heads) and positions dynamic: the
    scores ``q @ k^T`` (K the head size: the default tile, the few-rows tile up to 32 positions) and the context
    ``p @ v`` (K the positions: padded, and strided in ``v``: the portable tile's plain copies)."""
    pairs, length = (tirx.Var(name, "int64") for name in ("pairs", "length"))
    head = 64
    for product, transposed, a_columns, tile in (("scores", True, head, default_tile("sm_90")),
                                                 ("context", False, length, PORTABLE_TILE)):
        a = te.placeholder(_i64(pairs, length, a_columns), "int8", "a")
        b = te.placeholder(_i64(pairs, length, head), "int8", "b")
        source = kernel_cuda_source(te.create_prim_func([a, b, _product(a, b, transposed)]), "matmul",
                                    CUDAInt8Matmul(), "cuda-sm90")
        assert "wmma::mma_sync" in source
        shared = set(re.findall(r"int (cse_v\d+)", source))  # the host's int32 copy of the length, if any
        for p, t in ((2, 7), (3, 37), (8, 130)):  # the scores up to 32 positions on the few-rows kernel
            kernel, run_tile = (("matmul_kernel", FEW_ROWS_TILE) if transposed and t <= FEW_ROWS_TILE.shape[0]
                                else ("matmul_kernel_1" if transposed else "matmul_kernel", tile))
            run = emulated_kernel(source, kernel, tmp_path, block=(32, run_tile.warps_m * run_tile.warps_n))
            x, y = _int8(p, t, head if transposed else t), _int8(p, t, head)
            want = np.matmul(x.astype(np.int32), (y.transpose(0, 2, 1) if transposed else y).astype(np.int32))
            out = np.full(want.shape, -1, np.int32)
            run(_grid(run_tile, t, want.shape[-1], p), a=x, b=y, acc=out, pairs=p, length=t,
                **dict.fromkeys(shared, t))
            np.testing.assert_array_equal(out, want, err_msg=f"{product}, {p} x {t}")
