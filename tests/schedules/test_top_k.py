"""The top-k kernels: each row's k largest entries and their indices, descending, equal to a stable NumPy
sort for dynamic sizes (rows, lengths that are not multiples of its 16-entry blocks, fewer entries than k),
ties in index order; -inf and NaN are never selected (the slots left are -inf at index -1). The GPU kernel is
compared with the CPU one: its CUDA C run on this CPU (tests/cuda_emulation.py), and on a GPU where one is
visible."""
import shutil

import numpy as np
import pytest
import tvm

from int8mt.runtime.bundle import import_tvm_runtime
from int8mt.runtime.cuda import visible_gpu
from int8mt.schedules.top_k import top_k_gpu_kernel, top_k_kernel

from ..conftest import HOST_PRESET
from ..cuda_emulation import emulated_kernel, kernel_cuda_source


@pytest.fixture(scope="module")
def top_k():
    target = tvm.target.Target(HOST_PRESET.target)
    return {k: tvm.compile(tvm.IRModule({"main": top_k_kernel(k)}), target=target)["main"] for k in (1, 8)}


def _run(kernel, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    values, ids = (tvm.runtime.tensor(np.zeros((x.shape[0], k), dtype)) for dtype in (np.float32, np.int64))
    kernel(tvm.runtime.tensor(x), values, ids)
    return values.numpy(), ids.numpy()


@pytest.mark.parametrize("rows,n", [(1, 8000), (5, 37), (3, 16), (2, 8), (0, 20)])
@pytest.mark.parametrize("k", [1, 8])
def test_top_k_equals_a_stable_sort(top_k, rows, n, k):
    rng = np.random.default_rng(rows * 1000 + n)
    x = rng.integers(-50, 50, (rows, n)).astype(np.float32)  # many ties
    if rows:
        x[0, n // 2] = np.inf
        x[-1, :3] = [-np.inf, np.nan, 7.0]
    values, ids = _run(top_k[k], x, k)
    for row, (got_values, got_ids) in enumerate(zip(values, ids)):
        eligible = [j for j in np.argsort(-np.nan_to_num(x[row], nan=-np.inf), kind="stable") if x[row, j] > -np.inf]
        chosen = eligible[:k] + [-1] * (k - len(eligible[:k]))  # -inf and NaN are never candidates
        np.testing.assert_array_equal(got_ids, chosen)
        np.testing.assert_array_equal(got_values, [x[row, j] if j >= 0 else -np.inf for j in chosen])

def test_row_of_only_nan_and_minus_inf_selects_nothing(top_k):
    values, ids = _run(top_k[8], np.array([[np.nan, -np.inf, np.nan]], np.float32), 8)
    assert (values == -np.inf).all() and (ids == -1).all()


def test_gpu_kernel_keeps_at_most_what_fits_shared_memory():
    with pytest.raises(ValueError, match="at most 32 entries per row"):
        top_k_gpu_kernel(33)


@pytest.mark.parametrize("rows,n", [(1, 8000), (5, 37), (3, 5)])
def test_gpu_kernels_cuda_code_run_on_this_cpu_equals_the_cpu_kernel(top_k, rows, n, tmp_path):
    """The GPU kernel's CUDA C run on this CPU by an emulation of its thread blocks: the same values and indices as
    the CPU kernel, with ties, NaN, infinities and rows shorter than its threads' count."""
    if shutil.which("g++") is None:
        pytest.skip("runs the kernel's CUDA C on this CPU with g++ (Debian: apt-get install g++)")
    run = emulated_kernel(kernel_cuda_source(top_k_gpu_kernel(8), "top_k"), "top_k_kernel", tmp_path)
    rng = np.random.default_rng(rows + n)
    x = rng.integers(-50, 50, (rows, n)).astype(np.float32)  # many ties
    x[0, :2] = [np.nan, -np.inf]
    x[-1, n // 2] = np.inf
    values, ids = np.zeros((rows, 8), np.float32), np.zeros((rows, 8), np.int64)
    run((rows, 1), X=x, V=values, I=ids, rows=rows, n=n)
    cpu_values, cpu_ids = _run(top_k[8], x, 8)
    np.testing.assert_array_equal(ids, cpu_ids)
    np.testing.assert_array_equal(values, cpu_values)
    assert (ids[0] == -1).sum() == max(0, 8 - (n - 2))  # row 0's NaN and -inf never chosen


@pytest.mark.skipif(visible_gpu(import_tvm_runtime()) is None, reason="no CUDA GPU here")
@pytest.mark.parametrize("rows,n", [(1, 8000), (5, 37), (128, 8000), (3, 5)])
def test_gpu_kernel_equals_a_stable_sort(rows, n, tmp_path):
    """Through the pipeline, as a bundle's ``topk`` is compiled for a CUDA preset (our nvcc, our kernels)."""
    from tvm import relax

    from int8mt.schedules.cuda_tiles import build_kernel, load_kernel
    from int8mt.targets import get_preset

    x = relax.Var("x", relax.TensorType((tvm.tirx.Var("rows", "int64"), tvm.tirx.Var("n", "int64")), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            top = bb.emit_output(relax.op.topk(x, k=16, axis=-1, ret_type="both", largest=True, dtype="int64"))
        bb.emit_func_output(top)
    vm = load_kernel(tvm, tmp_path, "top_k", build_kernel(bb.get(), get_preset("cuda-sm90"), tmp_path, "top_k"))
    rng = np.random.default_rng(rows + n)
    x = rng.integers(-50, 50, (rows, n)).astype(np.float32)
    x[0, :2] = [np.nan, -np.inf]
    values, ids = vm["main"](tvm.runtime.tensor(x, tvm.cuda(0)))
    cpu_values, cpu_ids = _run(tvm.compile(tvm.IRModule({"main": top_k_kernel(16)}),
                                           target=tvm.target.Target(HOST_PRESET.target))["main"], x, 16)
    np.testing.assert_array_equal(ids.numpy(), cpu_ids)
    np.testing.assert_array_equal(values.numpy(), cpu_values)
