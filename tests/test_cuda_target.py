"""The CUDA target on a machine without a GPU: presets, the int8 tensor-core schedule (checked in the PTX nvcc
makes of it), a CUDA bundle of the tiny model and the runtime's refusals. With a GPU, the bundle also runs."""
import json
import re
import shutil

import pytest
import tvm
from tvm import relax
from tvm.script import relax as R

from int8mt.compiler.cuda import compile_ptx, cuda_source, find_nvcc
from int8mt.compiler.pipeline import compile_module
from int8mt.errors import UserError
from int8mt.runtime.bundle import Bundle, BundleError, import_tvm_runtime
from int8mt.runtime.cuda import KERNELS_FILE, KERNELS_SOURCE_FILE, GPUError, precompiled_kernels, visible_gpu
from int8mt.targets import AUTO, PRESETS, get_preset

from .conftest import edit_manifest

CUDA_PRESETS = [name for name, preset in PRESETS.items() if preset.device == "cuda"]
WMMA_S8 = "wmma.mma.sync.aligned.row.col.m16n16k16.s32.s8.s8.s32"
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
    """A linear layer with dynamic rows and a fused dequantize-and-bias epilogue, and both attention products
    of an encoder (dynamic batch and length)."""
    n, b, s = (tvm.tirx.Var(v, "int64") for v in ("n", "b", "s"))
    x, w = relax.Var("x", R.Tensor((n, 256), "int8")), relax.Var("w", R.Tensor((1024, 256), "int8"))
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
    assert len(matmuls) == 3, sorted(kernels)
    for kernel, body in matmuls.items():
        assert WMMA_S8 in body, f"{kernel} does not multiply on int8 tensor cores"
    assert re.search(r"\.target\s+sm_%s" % preset.target["arch"][3:], ptx)


def test_missing_nvcc_is_a_clear_error(monkeypatch, tmp_path):
    import nvidia

    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(nvidia, "__path__", [str(tmp_path)])
    with pytest.raises(UserError, match=r"pip install 'int8mt\[cuda\]'"):
        find_nvcc()


@pytest.fixture(scope="module")
def cuda_bundle(tiny_model_dir, tmp_path_factory):
    """The tiny model, INT8 with run-time ranges, compiled for cuda-sm90 (no GPU needed)."""
    from int8mt.compiler.build import build_bundle
    from int8mt.quant.config import QuantConfig

    out = tmp_path_factory.mktemp("bundles") / "tiny-cuda"
    build_bundle(tiny_model_dir, get_preset("cuda-sm90"), out, qcfg=QuantConfig(ranges="runtime"))
    return out


def test_cuda_bundle_has_every_matmul_in_integers_on_tensor_cores(cuda_bundle):
    manifest = json.loads((cuda_bundle / "manifest.json").read_text())
    assert manifest["cuda"]["arch"] == "sm_90" and manifest["cuda"]["compute_capability"] == [9, 0]
    assert {KERNELS_FILE, KERNELS_SOURCE_FILE} <= set(manifest["files"])
    quant = manifest["quantization"]
    assert quant["matmuls_int"] == quant["matmuls"] > 0
    kernels = ptx_entries(compile_ptx((cuda_bundle / KERNELS_SOURCE_FILE).read_text(), "sm_90"))
    linear = [k for k in kernels if "NT_matmul" in k]
    attention = [k for k in kernels if re.fullmatch(r"(fused_)?matmul\d*(_\w+)?_kernel", k)]
    assert linear and attention
    for kernel in linear:  # every linear layer, the output projection included
        assert WMMA_S8 in kernels[kernel], kernel
    on_tensor_cores = [k for k in attention if WMMA_S8 in kernels[k]]
    assert len(on_tensor_cores) >= 2  # the encoder's and decoder's prefix attention; one-row decoder steps run GEMV


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
    from int8mt.runtime.search import SearchOptions
    from int8mt.runtime.translator import Translator

    from .conftest import HOST_PRESET

    cpu = tmp_path / "cpu"
    build_bundle(tiny_model_dir, HOST_PRESET, cpu, qcfg=QuantConfig(ranges="runtime"))
    sentences = ["A man is riding a bike.", "Two dogs play in the snow.", "A woman reads a book in the park."]
    for beam in (1, 4):
        options = SearchOptions(beam_size=beam)
        assert Translator(cuda_bundle, options).translate(sentences) == Translator(cpu, options).translate(sentences)
