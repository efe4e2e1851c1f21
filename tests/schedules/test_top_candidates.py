"""The top-candidates kernels: each row's k largest entries and their indices, descending, equal to a stable
NumPy sort for dynamic sizes (rows, lengths that are not multiples of its 16-entry blocks, fewer entries than k),
ties in index order; -inf and NaN are never selected (the slots left are -inf at index -1); and the row's
log-sum-exp, the same float32 as the graph it replaces computes on this CPU (the first candidate's slice, TOPI's
``fast_exp``, the sum, the logarithm: four kernels) where rows are multiples of 16 entries, and closer to float64
elsewhere. The GPU kernel is compared with the CPU one: its CUDA C run on
this CPU (tests/cuda_emulation.py), and on a GPU where one is visible."""
import shutil

import numpy as np
import pytest
import tvm
from tvm import relax

from int8mt.compiler.legalize import legalize_passes
from int8mt.runtime.bundle import import_tvm_runtime
from int8mt.runtime.cuda import visible_gpu
from int8mt.schedules.cpu_generic import CPUGeneric
from int8mt.schedules.top_candidates import GPU_THREADS, top_candidates_kernel

from ..conftest import HOST_PRESET
from ..cuda_emulation import emulated_kernel, kernel_cuda_source


def _compiled(k: int):
    return tvm.compile(tvm.IRModule({"main": top_candidates_kernel(k).with_attr("global_symbol", "main")}),
                       target=tvm.target.Target(HOST_PRESET.target))["main"]


@pytest.fixture(scope="module")
def top_candidates():
    return {k: _compiled(k) for k in (1, 8)}


def _run(kernel, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    out = [tvm.runtime.tensor(np.zeros(shape, dtype))
           for shape, dtype in (((len(x), k), np.float32), ((len(x), k), np.int64), ((len(x),), np.float32))]
    kernel(tvm.runtime.tensor(x), *out)
    return tuple(o.numpy() for o in out)


def _stable_top(row: np.ndarray, k: int) -> list[int]:
    """The indices of the ``k`` largest entries of ``row`` (ties in index order), -1 where fewer are eligible."""
    eligible = [j for j in np.argsort(-np.nan_to_num(row, nan=-np.inf), kind="stable") if row[j] > -np.inf]
    return eligible[:k] + [-1] * (k - len(eligible[:k]))  # -inf and NaN are never candidates


@pytest.mark.parametrize("rows,n", [(1, 8000), (5, 37), (3, 16), (2, 8), (0, 20)])
@pytest.mark.parametrize("k", [1, 8])
def test_candidates_equal_a_stable_sort(top_candidates, rows, n, k):
    rng = np.random.default_rng(rows * 1000 + n)
    x = rng.integers(-50, 50, (rows, n)).astype(np.float32)  # many ties
    if rows:
        x[0, n // 2] = np.inf
        x[-1, :3] = [-np.inf, np.nan, 7.0]
    values, ids, _ = _run(top_candidates[k], x, k)
    for row, (got_values, got_ids) in enumerate(zip(values, ids)):
        chosen = _stable_top(x[row], k)
        np.testing.assert_array_equal(got_ids, chosen)
        np.testing.assert_array_equal(got_values, [x[row, j] if j >= 0 else -np.inf for j in chosen])


@pytest.mark.parametrize("rows,n", [(4, 8000), (2, 16), (3, 37), (1, 5), (8, 13468)])
def test_log_sum_exp_is_the_graphs_on_this_cpu(top_candidates, rows, n):
    """Where a row is a multiple of 16 entries, bit for bit what the graph the kernel replaces computes, compiled
    by the pipeline's legalization and CPU schedule (``fast_exp``; 16 partial sums); elsewhere that schedule sums
    the row serially, and the kernel's 16 partial sums are at least as close to NumPy's float64 log-sum-exp. Both
    within float32 rounding of it."""
    logits = relax.Var("logits", relax.TensorType((tvm.tirx.Var("rows", "int64"), n), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [logits]):
        with bb.dataflow():
            peak = bb.emit(relax.op.max(logits, axis=[-1], keepdims=True))
            total = bb.emit(relax.op.sum(relax.op.exp(relax.op.subtract(logits, peak)), axis=[-1]))
            out = bb.emit_output(relax.op.add(relax.op.log(total), relax.op.squeeze(peak, axis=[-1])))
        bb.emit_func_output(out)
    target = tvm.target.Target(HOST_PRESET.target)
    with target:
        mod = tvm.transform.Sequential([*legalize_passes(), tvm.s_tir.dlight.ApplyDefaultSchedule(CPUGeneric())])(
            bb.get())
    graph = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    rng = np.random.default_rng(n)
    x = (rng.standard_normal((rows, n)) * 6).astype(np.float32)
    _, _, log_sum_exp = _run(top_candidates[8], x, 8)
    graphs = graph["main"](tvm.runtime.tensor(x)).numpy()
    reference = np.log(np.exp(x.astype(np.float64) - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    if n % 16 == 0:
        np.testing.assert_array_equal(log_sum_exp, graphs)
    else:
        assert np.abs(log_sum_exp - reference).max() <= np.abs(graphs - reference).max()
    np.testing.assert_allclose(log_sum_exp, reference, rtol=2e-6)
    np.testing.assert_allclose(graphs, reference, rtol=2e-6)


def test_row_of_only_nan_and_minus_inf_selects_nothing(top_candidates):
    values, ids, log_sum_exp = _run(top_candidates[8], np.array([[np.nan, -np.inf, np.nan]], np.float32), 8)
    assert (values == -np.inf).all() and (ids == -1).all() and log_sum_exp[0] == -np.inf


def test_gpu_kernel_keeps_at_most_what_fits_shared_memory():
    with pytest.raises(ValueError, match="at most 32 entries per row"):
        top_candidates_kernel(33, gpu=True)


@pytest.mark.parametrize("rows,n", [(1, 8000), (5, 37), (3, 5), (2, GPU_THREADS * 3 + 1)])
def test_gpu_kernels_cuda_code_run_on_this_cpu_equals_the_cpu_kernel(top_candidates, rows, n, tmp_path):
    """The GPU kernel's CUDA C run on this CPU by an emulation of its thread blocks: the same values and indices as
    the CPU kernel, with ties, NaN, infinities and rows shorter than its threads' count, and the log-sum-exp within
    float32 rounding (the threads' sums are added in another order); a row of only -inf has -inf."""
    if shutil.which("g++") is None:
        pytest.skip("runs the kernel's CUDA C on this CPU with g++ (Debian: apt-get install g++)")
    source = kernel_cuda_source(top_candidates_kernel(8, gpu=True), "top_candidates")
    run = emulated_kernel(source, "top_candidates_kernel", tmp_path)
    rng = np.random.default_rng(rows + n)
    x = rng.integers(-50, 50, (rows, n)).astype(np.float32)  # many ties
    x[0, :2] = -np.inf
    x[-1, n // 2] = 60.0
    if rows > 1:
        x[-1, 0] = np.nan  # (a NaN makes no sum: the last row's log-sum-exp is not compared)
    if rows > 2:
        x[1] = -np.inf
    values, ids, log_sum_exp = (np.zeros(shape, dtype) for shape, dtype in (
        ((rows, 8), np.float32), ((rows, 8), np.int64), ((rows,), np.float32)))
    run((rows, 1), X=x, V=values, I=ids, L=log_sum_exp, rows=rows, n=n)
    cpu_values, cpu_ids, cpu_log_sum_exp = _run(top_candidates[8], x, 8)
    np.testing.assert_array_equal(ids, cpu_ids)
    np.testing.assert_array_equal(values, cpu_values)
    assert (ids[0] == -1).sum() == max(0, 8 - (n - 2))  # row 0's -inf never chosen
    compared = slice(0, max(1, rows - 1))
    np.testing.assert_allclose(log_sum_exp[compared], cpu_log_sum_exp[compared], rtol=1e-6)
    if rows > 2:
        assert log_sum_exp[1] == -np.inf and (ids[1] == -1).all()


@pytest.mark.skipif(visible_gpu(import_tvm_runtime()) is None, reason="no CUDA GPU here")
@pytest.mark.parametrize("rows,n", [(1, 8000), (5, 37), (128, 8000), (3, 5)])
def test_gpu_kernel_equals_the_cpu_kernel(rows, n, tmp_path):
    """Through the pipeline, as a bundle's ``top_candidates`` is compiled for a CUDA preset (the CPU kernel swapped
    for the GPU's at legalization; our nvcc, our kernels)."""
    from int8mt.schedules.cuda_tiles import build_kernel, load_kernel
    from int8mt.targets import get_preset

    any_rows = tvm.tirx.Var("rows", "int64")
    x = relax.Var("x", relax.TensorType((any_rows, n), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        kernel = bb.add_func(top_candidates_kernel(16), "row_candidates")
        with bb.dataflow():
            out = bb.emit_output(relax.call_tir(kernel, [x], [
                relax.TensorType((any_rows, 16), "float32"), relax.TensorType((any_rows, 16), "int64"),
                relax.TensorType((any_rows,), "float32")]))
        bb.emit_func_output(out)
    vm = load_kernel(tvm, tmp_path, "top_candidates",
                     build_kernel(bb.get(), get_preset("cuda-sm90"), tmp_path, "top_candidates"))
    rng = np.random.default_rng(rows + n)
    x = (rng.integers(-50, 50, (rows, n)) + rng.random((rows, n))).astype(np.float32)
    x[0, :2] = [-np.inf, -np.inf]
    values, ids, log_sum_exp = vm["main"](tvm.runtime.tensor(x, tvm.cuda(0)))
    cpu_values, cpu_ids, cpu_log_sum_exp = _run(_compiled(16), x, 16)
    np.testing.assert_array_equal(ids.numpy(), cpu_ids)
    np.testing.assert_array_equal(values.numpy(), cpu_values)
    np.testing.assert_allclose(log_sum_exp.numpy(), cpu_log_sum_exp, rtol=1e-6)
