"""Loading CUDA bundles: the GPU is checked before the library is opened, and the bundle's precompiled kernels
(``kernels.fatbin``, see :mod:`int8mt.compiler.cuda`) are handed to TVM, which would otherwise compile the CUDA
source in ``model.so`` with a CUDA compiler on this machine."""
from __future__ import annotations

import ctypes
import hashlib
from pathlib import Path
from typing import Any

from int8mt.errors import UserError

KERNELS_FILE = "kernels.fatbin"
KERNELS_SOURCE_FILE = "kernels.cu"  # their CUDA source, informational
_KERNELS: dict[str, bytes] = {}  # sha256 of a bundle's CUDA source -> its compiled kernels


class GPUError(UserError):
    """No GPU, or not one the bundle's kernels run on."""


def source_digest(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


def precompiled_kernels(source: str, *_target: Any) -> bytes:
    """TVM's ``tvm_callback_cuda_compile`` hook: the kernels compiled for this exact source when the bundle was
    built."""
    try:
        return _KERNELS[source_digest(source)]
    except KeyError:
        raise GPUError("the bundle's GPU kernels do not match its model.so (its kernels.fatbin belongs to another "
                       "build); rebuild the bundle with `int8mt compile`") from None


def register_kernels(source_sha256: str, kernels: bytes) -> None:
    """Make ``kernels`` (a fatbin) what TVM gets when it loads a CUDA module whose source has ``source_sha256``."""
    import tvm_ffi

    _KERNELS[source_sha256] = kernels
    tvm_ffi.register_global_func("tvm_callback_cuda_compile", precompiled_kernels, override=True)


def _load_cuda_runtime(tvm: Any) -> None:
    """Load TVM's CUDA runtime (``libtvm_runtime_cuda.so``), which a runtime-only TVM does not load by itself.
    It needs ``libcudart.so.13``: where the system has none, the one NVIDIA's CUDA 13 wheels install (with PyTorch,
    for instance) is loaded first. Errors are left to the caller's check for a device."""
    library = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
    try:
        ctypes.CDLL(str(library))
        return
    except OSError:
        pass
    try:
        import nvidia  # namespace package of NVIDIA's PyPI wheels
    except ImportError:
        return
    for folder in nvidia.__path__:
        for cudart in sorted(Path(folder).glob("cu13/lib/libcudart.so.13*")):
            try:
                ctypes.CDLL(str(cudart), mode=ctypes.RTLD_GLOBAL)
                ctypes.CDLL(str(library))
                return
            except OSError:
                continue


def visible_gpu(tvm: Any) -> tuple[Any, tuple[int, int]] | None:
    """The first CUDA GPU (a TVM device) and its compute capability; None where there is none."""
    if not tvm.runtime.enabled("cuda"):
        _load_cuda_runtime(tvm)
    try:
        device = tvm.cuda(0)
        if not device.exist:
            return None
        return device, tuple(int(part) for part in device.compute_version.split("."))
    except Exception:  # noqa: BLE001  (no CUDA driver: TVM's CUDA runtime is not even loaded)
        return None


def cuda_device(tvm: Any, manifest: dict) -> Any:
    """The first CUDA GPU, checked against the compute capability the bundle was compiled for."""
    preset = manifest["target"]["preset"]
    need = tuple(manifest["cuda"]["compute_capability"])
    wanted = f"an NVIDIA GPU of compute capability {need[0]}.{need[1]} or newer"
    gpu = visible_gpu(tvm)
    if gpu is None:
        raise GPUError(f"bundle was built for target {preset!r}, which needs {wanted}; no CUDA GPU is visible "
                       "here (no NVIDIA driver, or CUDA_VISIBLE_DEVICES hides it). Translate on a GPU machine, or "
                       "compile the model for this CPU (`int8mt targets`)")
    device, have = gpu
    if have < need:
        raise GPUError(f"bundle was built for target {preset!r}, which needs {wanted}; this GPU "
                       f"({device.device_name}) has compute capability {have[0]}.{have[1]}: compile the model "
                       f"with --target cuda-sm{have[0]}{have[1]}")
    return device
