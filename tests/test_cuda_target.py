"""The CUDA target on a machine without a GPU: presets, the int8 tensor-core schedule (checked in the PTX nvcc
makes of it), a CUDA bundle of the tiny model and the runtime's refusals. With a GPU, the bundle also runs."""
import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.s_tir import dlight
from tvm.script import relax as R

from int8mt.cli.inspect import format_report
from int8mt.compiler.cuda import compile_ptx, cuda_compiled_here, cuda_source, find_nvcc
from int8mt.compiler.passes import AttentionRows
from int8mt.compiler.pipeline import compile_module
from int8mt.errors import UserError
from int8mt.runtime.bundle import Bundle, BundleError, import_tvm_runtime
from int8mt.runtime.cuda import KERNELS_FILE, KERNELS_SOURCE_FILE, GPUError, precompiled_kernels, visible_gpu
from int8mt.schedules.cuda_attention_rows import CUDAAttentionRows
from int8mt.schedules.cuda_int8_matmul import PORTABLE_TILE, CUDAInt8Matmul, MatmulTile
from int8mt.schedules.cuda_rows import CUDARows, layer_norm_rows_function, quantize_rows_function
from int8mt.schedules.layer_norm_rows import RowQuantize, StaticQuantize
from int8mt.schedules.cuda_tiles import TILES_FILE, best_tiles, dense_module, load_tiles, shipped_tiles, write_tiles
from int8mt.targets import AUTO, PRESETS, get_preset

from .conftest import HOST_PRESET, TINY, edit_manifest, through_the_gpu_host_path
from .cuda_emulation import kernel_cuda_source

CUDA_PRESETS = [name for name, preset in PRESETS.items() if preset.device == "cuda"]
WMMA_S8 = "wmma.mma.sync.aligned.row.col.m16n16k16.s32.s8.s8.s32"
ASYNC_COPY_16 = re.compile(r"cp\.async\.cg\.shared\.global \[[^]]+\], \[[^]]+\], 16;")
GPU = visible_gpu(import_tvm_runtime())
needs_gpu = pytest.mark.skipif(GPU is None, reason="no CUDA GPU here")


def ptx_entries(ptx: str) -> dict[str, str]:
    """Each ``.entry`` (kernel) of a PTX module and its body."""
    starts = [(m.group(1), m.start()) for m in re.finditer(r"\.entry\s+(\w+)\s*\(", ptx)]
    return {name: ptx[start:(starts[i + 1][1] if i + 1 < len(starts) else len(ptx))]
            for i, (name, start) in enumerate(starts)}


def test_cuda_presets():
    assert {"cuda-sm75", "cuda-sm80", "cuda-sm86", "cuda-sm89", "cuda-sm90"} <= set(CUDA_PRESETS)
    for name in CUDA_PRESETS:
        preset = get_preset(name)
        target = tvm.target.Target(preset.target)
        major, minor = preset.compute_capability
        assert target.arch == f"sm_{major}{minor}" and name == f"cuda-sm{major}{minor}"
        for limit in ("max_threads_per_block", "max_shared_memory_per_block", "thread_warp_size", "registers_per_block"):
            assert int(target.attrs[limit]) > 0  # MetaSchedule and dlight need them spelled out
        assert target.host.kind.name == "llvm" and preset.required_features == ()


def test_auto_never_picks_a_gpu_preset(monkeypatch):
    from int8mt.targets import presets

    monkeypatch.setattr(presets, "host_features", lambda: set())
    with pytest.raises(UserError, match="no target preset fits this CPU"):
        get_preset(AUTO)


def _matmul_module() -> tvm.IRModule:
    """A linear layer with dynamic rows and a fused dequantize-and-bias epilogue (a shape no shipped tile table
    has), and both attention products of an encoder (dynamic batch and length)."""
    n, b, s = (tvm.tirx.Var(v, "int64") for v in ("n", "b", "s"))
    x, w = relax.Var("x", R.Tensor((n, 512), "int8")), relax.Var("w", R.Tensor((768, 512), "int8"))
    q, k = relax.Var("q", R.Tensor((b, 4, s, 64), "int8")), relax.Var("k", R.Tensor((b, 4, s, 64), "int8"))
    p = relax.Var("p", R.Tensor((b, 4, s, s), "int8"))
    bias = relax.const(0.5, "float32")
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w, q, k, p]):
        with bb.dataflow():
            dense = R.matmul(x, R.permute_dims(w), out_dtype="int32")
            y = bb.emit_output(R.add(R.multiply(R.astype(dense, "float32"), R.const(0.01, "float32")), bias))
            scores = bb.emit_output(R.matmul(q, R.permute_dims(k, [0, 1, 3, 2]), out_dtype="int32"))
            context = bb.emit_output(R.matmul(p, k, out_dtype="int32"))
        bb.emit_func_output(relax.Tuple([y, scores, context]))
    return relax.transform.FuseTransposeMatmul()(bb.get())


@pytest.mark.parametrize("name", ["cuda-sm75", "cuda-sm90"])
def test_int8_matmuls_compile_to_tensor_core_instructions(name):
    preset = get_preset(name)
    source = cuda_source(compile_module(_matmul_module(), preset))
    ptx = compile_ptx(source, preset.target["arch"])
    kernels = ptx_entries(ptx)
    matmuls = {k: body for k, body in kernels.items() if "matmul" in k}
    # sm_80 and newer: the linear layer and the attention scores (K = head size, contiguous in both operands)
    # fetch their tiles with 16-byte cp.async in a pipeline, each in two kernels (up to 32 rows and beyond); the
    # context product (K = keys, padded) does not
    streamed = 2 if preset.compute_capability >= (8, 0) else 0
    assert len(matmuls) == 3 + streamed, sorted(kernels)
    for kernel, body in matmuls.items():
        assert WMMA_S8 in body, f"{kernel} does not multiply on int8 tensor cores"
    assert re.search(r"\.target\s+sm_%s" % preset.target["arch"][3:], ptx)
    pipelined = {k for k, body in matmuls.items() if ASYNC_COPY_16.search(body)}
    assert len(pipelined) == 2 * streamed, sorted(pipelined)
    # every accumulator store into (possibly reused) shared memory sits between two barriers
    lines = source.splitlines()
    stores = [i for i, line in enumerate(lines) if "store_matrix_sync" in line]
    assert len(stores) >= 3
    for i in stores:
        assert lines[i - 1].strip() == lines[i + 1].strip() == "__syncthreads();"


def _row_kernel_body(func: tvm.tirx.PrimFunc, name: str, rule: dlight.ScheduleRule | None = None) -> str:
    """The CUDA source of the body of row function ``func`` scheduled by ``rule`` (default CUDARows) for
    cuda-sm90, after checking that it compiles to one kernel."""
    source = kernel_cuda_source(func, name, rule or CUDARows())
    assert list(ptx_entries(compile_ptx(source, "sm_90"))) == [f"{name}_kernel"]
    return source[source.index("{", source.index(f"{name}_kernel(")):]


@pytest.mark.parametrize("rank,columns", [(2, 256), (3, 1024), (3, 32), (4, None)])
def test_a_run_time_row_quantization_is_one_kernel_sharing_the_scale_behind_a_barrier(rank, columns):
    """CUDARows: a thread block per row reduces the magnitudes across its threads (warp shuffles), and the
    scale, which one thread computes into shared memory, is read by all after a barrier (never from global memory
    without one)."""
    body = _row_kernel_body(quantize_rows_function(rank, columns, 127.0, 1e-8), "quantize_rows")
    assert "__shfl_down_sync" in body
    divide = body.index("nearbyintf(")
    scale = body.rindex("compute_red_shared_ptr[0] = (max(", 0, divide)  # the scale, into shared memory
    assert "__syncthreads();" in body[scale:divide]


def _barrier_before_each_read_of_a_row_value(body: str) -> int:
    """Asserts that every value of the row one thread stores into shared memory (``if (threadIdx.x == 0 ...) {
    v[0] = ...; }``) is read by the block's other threads only after a barrier; returns how many such stores."""
    lines = [line.strip() for line in body.splitlines()]
    thread_0 = [bool(re.match(r"if \(+\(int\)threadIdx\.x\) == 0\)", line)) for line in lines]
    stores = 0
    for i, line in enumerate(lines):
        store = re.match(r"(\w+_shared_ptr(?:_\d+)?)\[0\] = ", line)
        if not (store and thread_0[i - 1]):
            continue
        stores += 1
        value = store.group(1) + "[0]"
        j = next((j for j in range(i + 1, len(lines)) if value in lines[j] and not thread_0[j - 1]), None)
        if j is not None:
            assert "__syncthreads();" in lines[i + 1:j], (line, lines[j])
    return stores


@pytest.mark.parametrize("quantize,rank,columns", [
    ((StaticQuantize(-3.0, 3.0, 0.025), StaticQuantize(-1.5, 1.5, 0.0125)), 3, 256),
    ((StaticQuantize(-3.0, 3.0, 0.025),), 2, 96),
    (RowQuantize(127.0, 1e-8), 3, 1024),
    (RowQuantize(127.0, 1e-8), 4, 512)])
def test_a_layer_norm_and_its_quantizations_are_one_kernel_keeping_the_row_in_shared_memory(quantize, rank, columns):
    """CUDARows on a layer norm with its quantizations: one kernel, a thread block per row; its sums (and the
    magnitudes of run-time ranges) reduced across the threads, the normalized row kept in shared memory, and every
    value of the row that one thread computes (mean, variance, scale) read by the others after a barrier."""
    body = _row_kernel_body(layer_norm_rows_function(rank, columns, 1e-5, quantize), "layer_norm_rows")
    reductions = 3 if isinstance(quantize, RowQuantize) else 2
    assert "__shfl_down_sync" in body
    assert len(re.findall(r"__shared__ alignas\(\d+\) float red_result_ptr(_\d+)?\[1\];", body)) == reductions
    assert re.search(r"__shared__ alignas\(\d+\) float \w+\[%d\];" % columns, body)  # the normalized row
    assert _barrier_before_each_read_of_a_row_value(body) >= reductions + 1
    stores = re.findall(r"(\w+)_ptr\[[^]]*\] = ", body)
    outputs = 1 + (2 if isinstance(quantize, RowQuantize) else len(quantize))
    assert len({name for name in stores if not name.startswith(("red_", "in_thread", "t0", "mask", "x_", "T_"))
                and "shared" not in name}) == outputs, stores


@pytest.mark.parametrize("function", ["quantize_rows", "layer_norm_static", "layer_norm_rows"])
def test_a_row_kernels_cuda_code_run_on_this_cpu_computes_the_functions_values(function, tmp_path):
    """The CUDA C of CUDARows' kernels, run on this CPU by an emulation of their thread blocks
    (tests/cuda_emulation.py), against the unscheduled function compiled for this CPU: a row quantization the
    same (its maximum is the same in any order); a layer norm within float rounding (its sums in another order),
    its quantizations at most one step apart where a value sits on a rounding boundary."""
    from .cuda_emulation import emulated_kernel

    if shutil.which("g++") is None:
        pytest.skip("runs the kernel's CUDA C on this CPU with g++ (Debian: apt-get install g++)")
    rows, columns = 5, 96
    func = {"quantize_rows": lambda: quantize_rows_function(2, None, 127.0, 1e-8),
            "layer_norm_static": lambda: layer_norm_rows_function(
                2, columns, 1e-5, (StaticQuantize(-3.0, 3.0, 0.025), StaticQuantize(-1.5, 1.5, 0.0125))),
            "layer_norm_rows": lambda: layer_norm_rows_function(2, columns, 1e-5, RowQuantize(127.0, 1e-8))}[function]()
    func = func.with_attr("global_symbol", function)
    rng = np.random.default_rng(4)
    arrays = {}
    for param in func.params:
        shape = [int(d) if isinstance(d, tvm.tirx.IntImm) else (rows, columns)[i]
                 for i, d in enumerate(param.ty.shape)]
        dtype = str(param.ty.dtype)
        arrays[param.name.replace(".", "_")] = (rng.standard_normal(shape).astype(dtype)
                                                if param.name in ("x", "gamma", "beta") else np.zeros(shape, dtype))
    sizes = {str(d): (rows, columns)[i] for i, d in enumerate(func.params[0].ty.shape)
             if isinstance(d, tvm.tirx.Var)}
    host = tvm.compile(tvm.IRModule({function: func}), target=tvm.target.Target(HOST_PRESET.target))
    expected = {name: tvm.runtime.tensor(a) for name, a in arrays.items()}
    host[function](*expected.values())

    source = kernel_cuda_source(func, function, CUDARows())
    emulated_kernel(source, f"{function}_kernel", tmp_path)((rows, 1), **arrays, **sizes)
    for name, array in arrays.items():
        want = expected[name].numpy()
        if array.dtype == np.float32:
            np.testing.assert_allclose(array, want, rtol=1e-5, atol=1e-6)
        elif function == "quantize_rows":
            np.testing.assert_array_equal(array, want)
        else:
            assert np.abs(array.astype(int) - want).max() <= 1 and (array != want).mean() < 0.01, name


@pytest.mark.parametrize("part", [0, 1])
def test_an_append_that_quantizes_its_rows_run_on_this_cpu_writes_what_this_cpus_kernel_writes(part, tmp_path):
    """``append_quantized_rows`` (the int8 rows, their scales) scheduled by CUDARows (a block per plane, row and
    head: its magnitude across the threads), its CUDA C run on this CPU (tests/cuda_emulation.py) against the kernel
    compiled for this CPU: the same cache, the rows before ``used`` and after the new ones untouched."""
    from int8mt.schedules.append_rows import append_quantized_rows_kernel

    from .cuda_emulation import emulated_kernel

    if shutil.which("g++") is None:
        pytest.skip("runs the kernel's CUDA C on this CPU with g++ (Debian: apt-get install g++)")
    planes, heads, width, count, rows, used = 6, 4, 64, 3, 9, 5
    func = append_quantized_rows_kernel(planes, heads, width, RowQuantize(127.0, 1e-8), part)
    func = func.with_attr("global_symbol", "append")
    rng = np.random.default_rng(8)
    new = [rng.standard_normal((count, heads, 1, width)).astype("float32") for _ in range(planes)]
    new[1][2, 3] = 0.0  # a head of zeros: the scale's floor
    cache = (rng.integers(-127, 128, (planes // 2, 2, rows, heads, width)).astype("int8") if part == 0
             else rng.uniform(0.01, 0.1, (planes // 2, 2, rows, heads, 1)).astype("float32"))
    expected = tvm.runtime.tensor(cache)
    host = tvm.compile(tvm.IRModule({"append": func}), target=tvm.target.Target(HOST_PRESET.target))
    host["append"](expected, *(tvm.runtime.tensor(x) for x in new), used)
    run = emulated_kernel(kernel_cuda_source(func, "append", CUDARows()), "append_kernel", tmp_path)
    got = cache.copy()
    run((planes * count * heads, 1), cache=got, **{f"new_{p}": x for p, x in enumerate(new)}, used=used,
        count=count, rows=rows)
    np.testing.assert_array_equal(got, expected.numpy())
    assert not np.array_equal(got[:, :, used:used + count], cache[:, :, used:used + count])


@pytest.mark.parametrize("attention", ["self", "cross"])
def test_an_attention_of_a_decoder_step_is_one_kernel_staging_each_chunk_of_probabilities(attention):
    """CUDAAttentionRows on AttentionRows' function: one kernel, a thread block per hypothesis and head; the scores
    in dynamic shared memory, their maximum and sum across the block (warp shuffles); each chunk of quantized
    probabilities stored into a fixed shared buffer between two barriers (the previous chunk's reads done, this
    chunk's stores seen) before the context's threads read it; the self-attention reads the rows through the
    index."""
    from .compiler.passes._modules import cross_attention_module, self_attention_module

    mod = AttentionRows()(self_attention_module() if attention == "self" else cross_attention_module())
    (func,) = [f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    body = _row_kernel_body(func, "attention_rows", CUDAAttentionRows())
    assert "extern __shared__" in body and body.count("__shfl_down_sync") >= 2
    gathers = re.findall(r"\w+_ptr\[\(*(?:min\(max\(\(int64_t\)0, )?\(*\w+_ptr\[", body)  # at an index read (clipped)
    assert len(gathers) == (2 if attention == "self" else 0)  # the keys' and the values' rows
    (chunk,) = re.findall(r"__shared__ alignas\(\d+\) signed char (\w+)\[64\];", body)
    store = body.index(f"{chunk}[((int64_t)threadIdx.x)] = ")
    loop = body.rindex("for (", 0, store)
    read = body.index(f"{chunk}[", store + 1)
    assert "__syncthreads();" in body[loop:store] and "__syncthreads();" in body[store:read]


def test_an_attention_quantizes_its_query_once_per_block_into_shared_memory():
    """Run-time ranges: the query's largest magnitude reduced across the block, its int8 values computed once, a
    column per thread, into shared memory, which the scores read after a barrier: the float query is read twice
    (the magnitude, the quantization), both before the loop over the positions."""
    from .compiler.passes._modules import runtime_self_attention_module
    from .compiler.passes.test_attention_rows import _attention_calls

    mod = AttentionRows()(runtime_self_attention_module())
    (func,) = [f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    (call,) = _attention_calls(mod)
    (query,) = [p.name for p, a in zip(func.params, call.args[1].fields) if a.name == "query"]
    body = _row_kernel_body(func, "attention_rows", CUDAAttentionRows())
    reads = [m.start() for m in re.finditer(rf"\b{query}_ptr\[", body)]
    positions = body.index("for (")
    assert len(reads) == 2 and reads[-1] < positions
    staged = re.search(r"(\w+_shared_ptr)\[\(\(int64_t\)threadIdx\.x\)\] = \(\(signed char\)", body[:positions])
    assert staged and "__syncthreads();" in body[staged.end():positions] and staged.group(1) in body[positions:]


def _attention_inputs(main: relax.Function, sizes: dict[str, int], rng: np.random.Generator) -> list[np.ndarray]:
    """Random inputs for the parameters of an attention test module's ``main`` (``sizes`` of its symbolic
    dimensions): indices into the cache's rows (directly, or each position's row in the history), most positions
    past, int8 values, small positive scales, source tokens a fifth of them padding."""
    inputs = []
    for param in main.params:
        shape = [int(d) if isinstance(d, tvm.tirx.IntImm) else sizes[str(d)] for d in param.ty.shape]
        dtype = str(param.ty.dtype)
        if param.name == "index":
            inputs.append(rng.integers(0, sizes["r"], shape))
        elif param.name == "history":  # each position's cache row of head 0 (of 2), 0 for none
            inputs.append(rng.integers(0, sizes["r"] // 2, shape))
        elif dtype == "bool":
            inputs.append(rng.random(shape) < 0.8)
        elif dtype == "int8":
            inputs.append(rng.integers(-127, 128, shape).astype("int8"))
        elif param.name in ("query", "key", "value"):  # float, quantized in the kernel
            inputs.append(rng.standard_normal(shape).astype("float32"))
        elif param.name == "src":  # tokens, a fifth padding
            inputs.append(rng.integers(0, 5, shape))
        else:
            inputs.append(rng.uniform(0.001, 0.01, shape).astype("float32"))
    return inputs


@pytest.mark.parametrize("attention", ["self", "cross", "runtime"])
def test_an_attention_kernels_cuda_code_run_on_this_cpu_computes_the_graphs_values(attention, tmp_path):
    """The CUDA C of each attention kernel (static ranges with the cache's gathers, with a mask; run-time ranges),
    run on this CPU by an emulation of its thread blocks (tests/cuda_emulation.py: threads, barriers, warp
    shuffles), against the graph before AttentionRows compiled for this CPU, at positions over two chunks of the
    kernel's threads: the same int8 rows (float results within float rounding: the softmax's sum in another
    order)."""
    from .compiler.passes._modules import (cross_attention_module, runtime_self_attention_module,
                                           self_attention_module)
    from .compiler.passes.test_attention_rows import _attention_calls, _run
    from .cuda_emulation import emulated_kernel

    if shutil.which("g++") is None:
        pytest.skip("runs the kernel's CUDA C on this CPU with g++ (Debian: apt-get install g++)")
    before = {"self": self_attention_module, "cross": cross_attention_module,
              "runtime": runtime_self_attention_module}[attention]()
    after = AttentionRows()(before)
    (func,) = [f for f in after.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    source = kernel_cuda_source(func, "attention_rows", CUDAAttentionRows())
    run = emulated_kernel(source, "attention_rows_kernel", tmp_path)

    sizes = {"b": 3, "t": 70, "s": 70, "r": 13}
    inputs = _attention_inputs(before["main"], sizes, np.random.default_rng(11))
    expected = _run(before, *inputs)[0]
    by_param = dict(zip(before["main"].params, inputs))
    (call,) = _attention_calls(after)
    arguments = {f"in{i}": by_param[a] for i, a in enumerate(call.args[1].fields)}
    out = np.zeros([3, 2, 1, 8], expected.dtype)
    output = next(p.name for p in func.params[len(arguments):])
    run((2, 3), **arguments, **{output: out}, **sizes)
    if expected.dtype == np.int8:
        np.testing.assert_array_equal(out.reshape(expected.shape), expected)
    else:
        np.testing.assert_allclose(out.reshape(expected.shape), expected, rtol=1e-5)
    assert len(np.unique(expected)) > 8


def _linear_kernel_ptx(rule: CUDAInt8Matmul, k: int = 512, n: int = 768) -> str:
    """The PTX of a dynamic-row linear layer's kernels (one, or up to 32 rows and beyond) scheduled with ``rule``
    for cuda-sm90."""
    preset = get_preset("cuda-sm90")
    mod = relax.transform.LegalizeOps()(dense_module(k, n))
    with tvm.target.Target(preset.target):
        mod = dlight.ApplyDefaultSchedule(rule)(mod)
    ptx = compile_ptx(cuda_source(compile_module(mod, preset)), preset.target["arch"])
    return "".join(body for kernel, body in ptx_entries(ptx).items() if "matmul" in kernel)


def test_tuned_tile_table_picks_the_tile_of_a_linear_layers_shape():
    assert ASYNC_COPY_16.search(_linear_kernel_ptx(CUDAInt8Matmul()))  # the sm_90 default tile: pipelined
    portable = _linear_kernel_ptx(CUDAInt8Matmul(tuned={(512, 768): PORTABLE_TILE}))
    assert WMMA_S8 in portable and "cp.async" not in portable
    other_shape = _linear_kernel_ptx(CUDAInt8Matmul(tuned={(256, 768): PORTABLE_TILE}))
    assert ASYNC_COPY_16.search(other_shape)


def test_tile_search_keeps_a_few_rows_tile_of_its_own_from_the_few_row_counts(tmp_path):
    """Row counts up to FEW_ROWS choose the shape's few-rows tile among their own measurements, apart from the
    others (a tile fastest at few rows but slowest at many is the few-rows tile only); the table keeps both."""
    big, small, other = dict(vector=16, stages=2), dict(warps_m=1, warps_n=4, vector=16, stages=2), dict(vector=4)
    rows = [{"k": 256, "n": 1024, "rows": r, "tile": t, "exact": True, "ms": ms}
            for r, t, ms in [(128, big, 0.004), (640, big, 0.006), (128, small, 0.009), (640, small, 0.030),
                             (4, small, 0.002), (32, small, 0.003), (4, other, 0.004), (32, other, 0.002)]]
    best = best_tiles(rows)[(256, 1024)]
    assert best["tile"] == asdict(MatmulTile(**big)) and set(best["us"]) == {"128", "640"}
    assert best["few"]["tile"] == asdict(MatmulTile(**small)) and best["few"]["us"] == {"4": 2.0, "32": 3.0}
    write_tiles(tmp_path, rows, "a GPU")
    assert load_tiles(tmp_path) == {(256, 1024): MatmulTile(**big)}
    assert load_tiles(tmp_path, few_rows=True) == {(256, 1024): MatmulTile(**small)}
    from int8mt.interface.tune import format_rows

    assert "| 256 x 1024 | 32x128x128 w1x4 v16 s2 | 2.0 at 4, 3.0 at 32 | 0 |" in format_rows(rows)


def test_tile_search_keeps_the_fastest_tile_exact_at_every_row_count(tmp_path):
    fast, slow = dict(vector=16, stages=2), dict(vector=4)
    rows = [{"k": 256, "n": 1024, "rows": r, "tile": t, "exact": exact, "ms": ms}
            for r, t, exact, ms in [(640, fast, True, 0.004), (128, fast, False, 0.003),
                                    (640, slow, True, 0.006), (128, slow, True, 0.006)]]
    rows += [{"k": 4096, "n": 4096, "rows": 4096, "tile": fast, "exact": True, "ms": 0.25},
             {"k": 4096, "n": 4096, "rows": 4096, "tile": slow, "exact": True, "ms": 0.40},
             {"k": 512, "n": 512, "rows": 640, "tile": fast, "error": "too many resources requested for launch"}]
    best = best_tiles(rows)
    assert best[(256, 1024)]["tile"] == asdict(MatmulTile(**slow))  # the faster tile was wrong at 128 rows
    assert best[(256, 1024)]["us"] == {"640": 6.0, "128": 6.0}
    assert best[(4096, 4096)]["tile"] == asdict(MatmulTile(**fast)) and (512, 512) not in best
    from int8mt.interface.tune import format_rows

    table = format_rows(rows)  # what `int8mt tune --target cuda-*` prints
    assert "| 256 x 1024 | 64x64x128 w2x2 v4 s1 | 6.0 at 128, 6.0 at 640 | 1 |" in table
    assert "| 4096 x 4096 | 64x64x128 w2x2 v16 s2 | 250.0 at 4096 | 0 |" in table
    write_tiles(tmp_path, rows, "a GPU")
    assert load_tiles(tmp_path) == {(256, 1024): MatmulTile(**slow), (4096, 4096): MatmulTile(**fast)}
    assert load_tiles(tmp_path, few_rows=True) == {}
    (tmp_path / TILES_FILE).write_text("{}")
    with pytest.raises(UserError, match="is not a CUDA tile table"):
        load_tiles(tmp_path)


def test_shipped_tile_table_loads():
    tiles = shipped_tiles("sm_90")
    assert (4096, 4096) in tiles and all(isinstance(t, MatmulTile) for t in tiles.values())
    assert shipped_tiles("sm_75") == {}


@pytest.mark.skipif(GPU is not None, reason="this machine has a GPU")
def test_tuning_a_cuda_preset_without_a_gpu_says_how_to_tune_elsewhere(tiny_model_dir, tmp_path):
    from int8mt.interface.tune import TuneArgs, tune

    args = TuneArgs(source=tiny_model_dir, preset=get_preset("cuda-sm90"), database=tmp_path, trials=1,
                    budget_minutes=1)
    with pytest.raises(UserError, match=r"no CUDA GPU is visible here.*cuda_gpu_check\.py prepare DIR --tiles"):
        tune(args)


def test_tuning_a_cuda_presets_fp32_layers_is_refused(tiny_model_dir, tmp_path):
    from int8mt.interface.tune import TuneArgs, tune

    args = TuneArgs(source=tiny_model_dir, preset=get_preset("cuda-sm90"), database=tmp_path, trials=1,
                    budget_minutes=1, fp32=True)
    with pytest.raises(UserError, match="runs FP32 layers with TVM's GPU schedules, not kernels of ours"):
        tune(args)


@pytest.mark.skipif(GPU is not None, reason="this machine has a GPU")
def test_kernel_benchmark_of_a_cuda_preset_needs_the_gpu():
    from int8mt.interface.bench_kernels import bench_kernels

    with pytest.raises(UserError, match=r"no CUDA GPU is visible here.*cuda_gpu_check\.py prepare DIR"):
        bench_kernels(get_preset("cuda-sm90"), None)


def test_a_build_after_a_bundle_loaded_compiles_its_own_kernels():
    """Loading a bundle registers its precompiled kernels as TVM's CUDA compile hook; a later build in the same
    process (a benchmark, a tile search) must still get its CUDA source, compiled by us where TVM compiles at
    build time, and the hook must stay for the bundle."""
    import tvm_ffi

    from int8mt.runtime.cuda import register_kernels

    register_kernels("0" * 64, b"not a fatbin")
    try:
        preset = get_preset("cuda-sm90")
        assert "__global__" in cuda_source(compile_module(_matmul_module(), preset))
        with cuda_compiled_here("sm_90"):  # what a build on a GPU machine calls
            fatbin = tvm_ffi.get_global_func("tvm_callback_cuda_compile")('extern "C" __global__ void k() {}')
        assert isinstance(fatbin, bytes) and len(fatbin) > 0
        with pytest.raises(Exception, match="belongs to another build"):  # the bundle's hook is back
            tvm_ffi.get_global_func("tvm_callback_cuda_compile")("a source no bundle was built from")
    finally:
        tvm_ffi.remove_global_func("tvm_callback_cuda_compile")


def test_pipelined_tiles_keep_operands_that_are_not_contiguous_along_k_on_the_portable_tile():
    """A B operand stored K-major ([k, n], as a transposed key cache is) cannot be fetched 16 bytes at a time
    along K: its matmul is scheduled on the portable tile, without cp.async, at any architecture."""
    n = tvm.tirx.Var("n", "int64")
    x, w = relax.Var("x", R.Tensor((n, 256), "int8")), relax.Var("w", R.Tensor((256, 1000), "int8"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit_output(R.matmul(x, w, out_dtype="int32"))
        bb.emit_func_output(y)
    preset = get_preset("cuda-sm90")
    ptx = compile_ptx(cuda_source(compile_module(bb.get(), preset)), preset.target["arch"])
    (body,) = [body for kernel, body in ptx_entries(ptx).items() if "matmul" in kernel]
    assert WMMA_S8 in body and "cp.async" not in body


def test_rows_padded_to_the_tile_read_real_rows_spread_over_the_operand():
    """With 16-byte copies, a row padded to the tile reads row ``i mod rows`` (in 32-bit arithmetic) instead of
    zeros: no zero-fill branch, and the padded rows' copies spread over the operand's rows instead of all reading
    the last one."""
    preset = get_preset("cuda-sm90")
    mod = relax.transform.LegalizeOps()(dense_module(512, 768))
    with tvm.target.Target(preset.target):
        mod = dlight.ApplyDefaultSchedule(CUDAInt8Matmul(MatmulTile(frags_m=4, frags_n=4, vector=16, stages=2)))(mod)
    source = cuda_source(compile_module(mod, preset))
    copies = [line for line in source.splitlines() if "cp_async" in line and "x_ptr" in line]
    assert copies and all("% ((int)rows)" in line and "min(" not in line for line in copies), copies
    # the weights' 768 columns fill whole tiles: read as they are
    assert all("% " not in line for line in source.splitlines() if "cp_async" in line and "w_ptr" in line)


def test_missing_nvcc_is_a_clear_error(monkeypatch, tmp_path):
    import nvidia

    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(nvidia, "__path__", [str(tmp_path)])
    with pytest.raises(UserError, match=r"pip install 'int8mt\[cuda\]'"):
        find_nvcc()


@pytest.fixture(scope="module")
def cuda_bundle(tiny_model_dir, tmp_path_factory):
    """The tiny model, INT8 with run-time ranges and int8 attention, compiled for cuda-sm90 (no GPU needed)."""
    from int8mt.compiler.build import build_bundle
    from int8mt.quant.config import QuantConfig

    out = tmp_path_factory.mktemp("bundles") / "tiny-cuda"
    build_bundle(tiny_model_dir, get_preset("cuda-sm90"), out, dump_dir=out.parent / "ir",
                 qcfg=QuantConfig(ranges="runtime", runtime_attention="int8"))
    return out


def linear_layer_kernels(bundle) -> set[str]:
    """The kernels (PTX entry names) of the bundle's linear layers: the matmuls its build's phase 4 calls with a
    weight, a constant, as the second operand."""
    scheduled = (bundle.parent / "ir" / "phase4-scheduled.py").read_text()
    return {f"{name}_kernel" for name in re.findall(r'R\.call_tir\(cls\.(\w*matmul\w*), \(\w+, metadata\[',
                                                        scheduled)}


def test_cuda_bundle_has_every_matmul_in_integers_on_tensor_cores(cuda_bundle):
    manifest = json.loads((cuda_bundle / "manifest.json").read_text())
    assert manifest["cuda"]["arch"] == "sm_90" and manifest["cuda"]["compute_capability"] == [9, 0]
    assert {KERNELS_FILE, KERNELS_SOURCE_FILE} <= set(manifest["files"])
    quant = manifest["quantization"]
    assert quant["matmuls_int"] == quant["matmuls"] > 0
    kernels = ptx_entries(compile_ptx((cuda_bundle / KERNELS_SOURCE_FILE).read_text(), "sm_90"))
    linear = linear_layer_kernels(cuda_bundle)
    assert linear <= set(kernels)
    attention = [k for k in kernels if re.fullmatch(r"(fused_)?matmul\d*(_\w+)?_kernel", k)]
    assert linear and attention
    for kernel in linear:  # every linear layer, the output projection included
        assert WMMA_S8 in kernels[kernel], kernel
    on_tensor_cores = [k for k in attention if WMMA_S8 in kernels[k]]
    assert len(on_tensor_cores) >= 2  # the encoder's and decoder's prefix attention; one-row decoder steps run GEMV
    # a linear layer's dequantization (or requantization) is its kernel's epilogue, not a kernel that starts by
    # converting the int32 result (ReshapesAfterElementwise: the reshapes into the heads' layout kept them apart)
    assert not [k for k in kernels if re.match(r"fused_(relu\d*_)?cast\d+_multiply", k)]


def test_cuda_bundle_takes_candidates_and_appends_cache_rows_with_one_kernel_each(cuda_bundle):
    """Beam search's candidates and each row's log-sum-exp come from one kernel of ours, the GPU's (a thread block
    per row, lists merged and sums added in shared memory), not TVM's sort of each whole row and a reduction, and
    its choice of hypotheses from the GPU's kernel of it (a thread per sentence); a step's keys and values go into
    the cache with one kernel per cache buffer (the int8 keys and values, and their scales with run-time ranges,
    which these kernels compute)."""
    manifest = json.loads((cuda_bundle / "manifest.json").read_text())
    kernels = ptx_entries(compile_ptx((cuda_bundle / KERNELS_SOURCE_FILE).read_text(), "sm_90"))
    candidates = [k for k in kernels if k.startswith("row_candidates")]
    assert len(candidates) == 1 and ".shared" in kernels[candidates[0]] and "bar.sync" in kernels[candidates[0]]
    assert "%ctaid.x" in kernels[candidates[0]] and "%tid.x" in kernels[candidates[0]]
    assert not [k for k in kernels if "sort" in k or k.startswith(("topk", "top_k"))]
    scheduled = (cuda_bundle.parent / "ir" / "phase4-scheduled.py").read_text()
    assert _relax_function(scheduled, "top_candidates").count("R.call_tir(") == 1
    select = [k for k in kernels if k.startswith("beam_select")]
    assert len(select) == 1 and "%tid.x" in kernels[select[0]] and "%ctaid.x" in kernels[select[0]]
    appends = [k for k in kernels if k.startswith(("append_rows", "append_quantized_rows"))]
    assert len(appends) == 1 + manifest.get("cache_scales", False)


def _relax_function(module_text: str, name: str) -> str:
    """The text of Relax function ``name`` in a dumped module's, up to the next Relax function."""
    text = module_text[module_text.index(f"def {name}("):]
    return text[:text.index("    @R.function") if "    @R.function" in text else len(text)]


def _legalized_step(bundle) -> str:
    """The decoder step of ``bundle``'s build after phase 3."""
    return _relax_function((bundle.parent / "ir" / "phase3-legalized.py").read_text(), "decode_step")


def test_cuda_bundle_quantizes_each_row_at_run_time_in_one_kernel(cuda_bundle):
    """Run-time ranges: each row quantization of the decoder step (every one along the last axis) is one call of
    the row-quantizing kernel, not a magnitude reduction, a scale and a quantization of their own."""
    calls = re.findall(r"R\.call_tir\(cls\.(\w+),", _legalized_step(cuda_bundle))
    assert "quantize_rows" in calls
    assert not [k for k in calls if re.match(r"fused_tir_abs\d*_max|fused_maximum\d*_divide", k)]


def test_cuda_bundle_computes_each_attention_of_a_decoder_step_in_one_kernel(cuda_bundle):
    """Run-time ranges: each of the decoder step's attentions (self and cross, per layer) is one call of an
    attention function, with its scales, gathers (their rows' index and the past positions from the step's
    history), the query's, the step's key's and value's and the probabilities' row quantizations inside: no softmax,
    gather, index, query, key or value quantization or attention product kernel of its own."""
    from .conftest import TINY

    step = _legalized_step(cuda_bundle)
    assert {re.match(r"\s*\w+ = R\.call_tir\(cls\.attention_rows", line) is not None
            for line in step.splitlines()[1:] if re.search(r"\bhistory\b", line)} == {True}  # (after the def)
    calls = re.findall(r"R\.call_tir\(cls\.(\w+),", step)
    assert len([c for c in calls if c.startswith("attention_rows")]) == 2 * TINY.decoder_layers
    # each writes its result as the output projection reads it, [batch, 1, d_model], not in the heads' layout
    written = re.findall(r"R\.call_tir\(cls\.attention_rows\w*, \(.*\), out_ty=R\.Tensor\(\(\w+, 1, (\d+)\)", step)
    assert written == [str(TINY.d_model)] * 2 * TINY.decoder_layers
    assert not [c for c in calls if "softmax" in c or "take" in c and "where" in c or re.match(r"(fused_)?matmul", c)]
    # each is CUDAAttentionRows' kernel (a block per hypothesis and head, reductions by shuffles), not dlight's
    # fallback, which would compute the same values on a grid of one axis
    kernels = ptx_entries(compile_ptx((cuda_bundle / KERNELS_SOURCE_FILE).read_text(), "sm_90"))
    attention = [body for name, body in kernels.items() if name.startswith("attention_rows")]
    assert attention and all("%ctaid.y" in body and "shfl.sync.down" in body for body in attention)
    # the queries', keys' and values' per-head quantizations are inside too (the cache's appends quantize the keys
    # and values themselves): none is a kernel of its own
    per_head = rf"R\.call_tir\(cls\.quantize_rows\d*, \(\w+,\), out_ty=\[R\.Tensor\(\(\w+, {TINY.heads}, 1, "
    assert not re.findall(per_head, step) and "append_quantized_rows" in step


def test_cuda_bundle_quantizes_a_layer_norms_result_in_the_layer_norms_kernel(cuda_bundle):
    """Each layer norm of the decoder step whose result the next linear layer quantizes is one call returning the
    quantization too: no quantization kernel reads a layer norm's result."""
    step = _legalized_step(cuda_bundle)
    assert "R.call_tir(cls.layer_norm_rows, " in step
    for y in re.findall(r"(\w+) = R\.call_tir\(cls\.layer_norm\d*, ", step):
        assert not re.search(rf"R\.call_tir\(cls\.\w*quantize\w*, \({y}[,)]", step), y


def test_cuda_bundle_kernels_read_cache_planes_and_reshaped_tensors_where_they_are_stored(cuda_bundle):
    """ViewsIntoKernels and UnitReshapeIntoKernels on CUDA presets: a decoder step passes its kernels the stacked
    caches themselves (no view per layer: an offset computed, a tensor made, its offset checked) and the tensors
    behind reshapes (each linear layer's result to the per-head row quantization and to ``append_rows``): no view
    at all."""
    step = _relax_function((cuda_bundle.parent / "ir" / "phase5-lowered.py").read_text(), "decode_step")
    assert "cls." in step
    assert "ensure_zero_offset" not in step and "compute_symbolic_expr" not in step
    assert "vm.builtin.reshape" not in step  # (chains of reshapes followed back, in-place kernels too)


def test_a_kernel_on_a_cache_plane_gets_the_planes_address_from_the_host():
    """A kernel reading one plane of a stacked parameter, compiled for a GPU: the host passes the kernel the
    parameter's address plus the plane's offset (plane 3 of ``[3, 2, b, 4, t, 64]`` int8: ``768 * b * t`` bytes)."""
    @tvm.script.ir_module
    class Plane:
        @R.function
        def main(cache: R.Tensor((3, 2, "b", 4, "t", 64), "int8"), x: R.Tensor(("b", 4, "t", 64), "int8")):
            with R.dataflow():
                keys = R.take(R.take(cache, R.const(1, "int64"), axis=0), R.const(1, "int64"), axis=0)
                y = R.add(keys, x)
                R.output(y)
            return y

    host = compile_module(Plane, get_preset("cuda-sm90")).mod.imports[0].inspect_source("ll")
    offset = re.search(r"(%\w+) = mul i64 (%\w+), 768\b", host)
    assert offset, "the plane's offset"
    assert re.search(r"getelementptr inbounds i8, ptr %\w+, i64 " + offset.group(1) + r"\b", host)
    product = re.search(offset.group(2) + r" = mul i64 %(\w+), %(\w+)", host)
    assert product and {"keys_source_2", "keys_source_4"} == set(product.groups())  # the parameter's b and t


@pytest.mark.skipif(GPU is not None, reason="this machine has a GPU")
def test_cuda_bundle_without_a_gpu_is_refused_with_a_message(cuda_bundle):
    with pytest.raises(GPUError, match=r"needs an NVIDIA GPU of compute capability 9\.0 or newer; no CUDA GPU"):
        Bundle(cuda_bundle)


def test_cuda_bundle_manifest_needs_its_cuda_record(cuda_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(cuda_bundle, copy)
    edit_manifest(copy, lambda m: m.pop("cuda"))
    with pytest.raises(BundleError, match="has no 'cuda'"):
        Bundle(copy)


def test_kernels_of_another_build_are_refused():
    with pytest.raises(GPUError, match="kernels.fatbin belongs to another build"):
        precompiled_kernels("extern \"C\" __global__ void k() {}")


@needs_gpu
def test_cuda_bundle_translates_as_the_cpu_bundle(cuda_bundle, tiny_model_dir, tmp_path):
    from int8mt.compiler.build import build_bundle
    from int8mt.quant.config import QuantConfig
    from int8mt.runtime.options import SearchOptions
    from int8mt.runtime.translator import Translator

    from .conftest import HOST_PRESET

    cpu = tmp_path / "cpu"
    build_bundle(tiny_model_dir, HOST_PRESET, cpu, qcfg=QuantConfig(ranges="runtime", runtime_attention="int8"))
    sentences = ["A man is riding a bike.", "Two dogs play in the snow.", "A woman reads a book in the park."]
    for beam in (1, 4):
        options = SearchOptions(beam_size=beam)
        assert Translator(cuda_bundle, options).translate(sentences) == Translator(cpu, options).translate(sentences)


@pytest.fixture(scope="module")
def cuda_graphs_bundle(tiny_model_dir, tmp_path_factory):
    """The cuda_bundle's model built with ``--cuda-graphs`` (no GPU needed)."""
    from int8mt.compiler.build import build_bundle
    from int8mt.quant.config import QuantConfig

    out = tmp_path_factory.mktemp("bundles") / "tiny-cuda-graphs"
    build_bundle(tiny_model_dir, get_preset("cuda-sm90"), out, dump_dir=out.parent / "ir",
                 qcfg=QuantConfig(ranges="runtime", runtime_attention="int8"), cuda_graphs=True)
    return out


def _step_calls(lowered: str, function: str) -> list[str]:
    """The functions that ``function`` of a phase-5 module calls (kernels, lifted Relax functions), in order."""
    return re.findall(r"cls\.(\w+)", _relax_function(lowered, function))


def test_with_cuda_graphs_the_step_launches_only_its_input_and_output_kernels_beside_its_graphs(cuda_graphs_bundle):
    """Each decoder step's linear layer but the logits' (which writes the step's output), each layer norm and row
    quantization runs inside a captured function; launched alone are the kernels that read the step's inputs (the
    embedding of its tokens, the attentions reading the caches and the source, the appends) and the logits."""
    lowered = (cuda_graphs_bundle.parent / "ir" / "phase5-lowered.py").read_text()
    step = _step_calls(lowered, "decode_step")
    graphs = [name for name in step if name.startswith("decode_step_cuda_graph_capture")]
    alone = [name for name in step if name not in graphs and name != "cuda_graph_alloc"]
    captured = [name for graph in graphs for name in _step_calls(lowered, graph)]
    assert not [name for name in alone if "layer_norm" in name or "quantize_rows" in name]
    assert len([name for name in alone if "matmul" in name]) == 1  # the logits, the step's output
    # each layer's query, key, value, output, cross query, cross output, FFN 1 and 2
    assert sum("matmul" in name for name in captured) == 8 * TINY.decoder_layers
    assert len(alone) + len(graphs) < (len(alone) + len(captured)) / 2  # launches with graphs and without
    manifest = json.loads((cuda_graphs_bundle / "manifest.json").read_text())
    report = json.loads((cuda_graphs_bundle / "report.json").read_text())
    assert manifest["cuda_graphs"] and "decoder step as CUDA graphs" in format_report(manifest, report, Path("b"))
    assert "cuda_graph" not in "".join(_step_calls(lowered, "encode"))


def test_a_bundle_with_cuda_graphs_built_for_this_cpu_translates_as_one_without(tiny_bundle, tiny_model_dir, tmp_path):
    """The tiny model built with CUDA graphs for this CPU, its virtual machine's graph builtins emulated as strictly
    as a graph replays (tests/cuda_graph_emulation.py: a later call that hands a graph other memory fails): the
    translations of the bundle without graphs, greedy and beam 2, at several row counts, also driven through the
    GPU host path (its inputs at offsets of one staging buffer that moves as it grows); graphs were replayed."""
    from int8mt.compiler.build import build_bundle
    from int8mt.runtime.bundle import Bundle
    from int8mt.runtime.options import SearchOptions
    from int8mt.runtime.search import beam_search, greedy_search
    from int8mt.runtime.translator import Translator

    from .cuda_graph_emulation import EmulatedCUDAGraphs

    graphs_bundle = tmp_path / "graphs"
    assert build_bundle(tiny_model_dir, HOST_PRESET, graphs_bundle, cuda_graphs=True)["cuda_graphs"]
    sentences = ["A man is riding a bike.", "Two dogs play in the snow.", "A woman reads a book in the park.",
                 "A child.", "People walk down a busy street at night while it rains."]
    with EmulatedCUDAGraphs() as graphs:
        pairs = [[Translator(bundle, SearchOptions(beam_size=beam), batch_size=3) for bundle in (graphs_bundle,
                                                                                               tiny_bundle)]
                 for beam in (1, 2)]  # (all alive in the block: the emulation knows a virtual machine by its address)
        for with_graphs, without in pairs:
            assert with_graphs.translate(sentences) == without.translate(sentences)
        gpu, cpu = through_the_gpu_host_path(Bundle(graphs_bundle)), Bundle(tiny_bundle)
        src = np.random.default_rng(2).integers(4, 8000, (5, 8))
        src[1, 3:] = cpu.pad_id
        max_lens = [4, 25, 9, 30, 2]  # (sentences leave the batch: new row counts, new graphs)
        assert beam_search(gpu, src, max_lens, SearchOptions(beam_size=1)) == greedy_search(cpu, src, max_lens)
        opts = SearchOptions(beam_size=2)
        assert beam_search(gpu, src, max_lens, opts) == beam_search(cpu, src, max_lens, opts)
    assert graphs.replays > graphs.captures > 0


@needs_gpu
def test_a_cuda_bundle_with_graphs_translates_as_one_without(cuda_bundle, cuda_graphs_bundle):
    from int8mt.runtime.options import SearchOptions
    from int8mt.runtime.translator import Translator

    sentences = ["A man is riding a bike.", "Two dogs play in the snow.", "A woman reads a book in the park.",
                 "A child.", "People walk down a busy street at night while it rains."]
    for beam in (1, 4):
        options = SearchOptions(beam_size=beam)
        assert (Translator(cuda_graphs_bundle, options, batch_size=3).translate(sentences)
                == Translator(cuda_bundle, options, batch_size=3).translate(sentences))
    with pytest.raises(BundleError, match="one model per process"):
        Translator(cuda_graphs_bundle, replicas=2)


@pytest.mark.extended
@pytest.mark.parametrize("ranges", ["calibrate", "runtime"])
def test_the_kernel_phase_of_a_gpu_preset_computes_the_same_on_this_cpu(tiny_model_dir, ranges):
    """The tiny model's integer graph after phase 2 for cuda-sm90 (run-time row quantizations as one function each,
    keys read as stored, reshapes after the elementwise ops) and before it, both compiled for this CPU: the
    encoder's output and a decoder step's logits and cache rows are the same (integers exactly; floats within a
    rounding, as a multiply and an add fused into one kernel may become one fused multiply-add)."""
    from int8mt.compiler.pipeline import CompileOptions, import_model, kernels, scale_propagated
    from int8mt.quant.checkpoint import quantized_model
    from int8mt.quant.config import QuantConfig

    from .conftest import DATA_DIR, HOST_PRESET, TINY

    qcfg = QuantConfig(ranges=ranges, runtime_attention="int8") if ranges == "runtime" else QuantConfig(ranges=ranges)
    options = CompileOptions(get_preset("cuda-sm90"), qcfg)
    model = quantized_model(tiny_model_dir, qcfg, DATA_DIR, calib_sentences=16)
    graph = scale_propagated(import_model(model, options), options)
    rows, length, cache_rows = 4, 7, 8
    rng = np.random.default_rng(5)
    src = rng.integers(4, TINY.vocab_size, (rows, length))
    step_inputs = {"tokens": rng.integers(4, TINY.vocab_size, (rows, 1)), "step": np.array([2]),
                   "history": rng.integers(0, cache_rows, (rows, 3)), "src": src}
    outputs = []
    for mod in (relax.transform.FuseTransposeMatmul()(graph), kernels(graph, options)):
        vm = relax.VirtualMachine(compile_module(mod, HOST_PRESET), tvm.cpu())
        cross = vm["encode"](tvm.runtime.tensor(src))
        cross = [cross] if isinstance(cross, tvm.runtime.Tensor) else list(cross)
        cache_rng, inputs = np.random.default_rng(6), []  # the same cache contents for both
        for param in mod["decode_step"].params:
            name = str(param)
            if name.startswith("cross_"):
                inputs.append(cross[int(name.removeprefix("cross_"))])
            elif name.startswith("cache_"):  # int8 rows, or their float32 scales
                shape = [int(d) if isinstance(d, tvm.tirx.IntImm) else cache_rows for d in param.ty.shape]
                values = (cache_rng.integers(-127, 128, shape) if str(param.ty.dtype) == "int8"
                          else cache_rng.uniform(0.01, 0.1, shape))
                inputs.append(tvm.runtime.tensor(values.astype(str(param.ty.dtype))))
            elif name == "rows_used":
                inputs.append(tvm.runtime.ShapeTuple([rows]))
            else:
                inputs.append(tvm.runtime.tensor(step_inputs[name].astype("int64")))
        outputs.append([x.numpy() for x in (*cross, *vm["decode_step"](*inputs))])
    for before, after in zip(*outputs):
        if before.dtype == np.float32:
            np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(after, before)
