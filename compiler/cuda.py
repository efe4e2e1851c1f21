"""GPU code of CUDA bundles, compiled when the bundle is built, on a machine that needs no GPU.

TVM 0.27 keeps a CUDA module as CUDA C source and compiles it when the library is loaded (through the
``tvm_callback_cuda_compile`` hook), which would need a CUDA compiler on every machine that translates. We compile
the source here instead, with ``nvcc`` (from ``pip install 'int8mt[cuda]'``, a CUDA toolkit on ``PATH``, or
``CUDA_PATH``), into a fatbin holding SASS for the preset's architecture plus PTX that newer GPUs JIT-compile; the
bundle ships it beside ``model.so`` and the runtime hands it to TVM at load time (:mod:`int8mt.runtime.cuda`).
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import tvm
import tvm_ffi

from int8mt.errors import UserError

NVCC_FLAGS = ("-O3", "--expt-relaxed-constexpr", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__")
INSTALL_HINT = "install it with `pip install 'int8mt[cuda]'` (the CUDA compiler from PyPI) or put a CUDA toolkit's nvcc on PATH"


def find_nvcc() -> Path:
    """The ``nvcc`` to use: ``CUDA_PATH/bin``, then the one ``nvidia-cuda-nvcc`` installs into this Python, then
    ``PATH``."""
    candidates = []
    if os.environ.get("CUDA_PATH"):
        candidates.append(Path(os.environ["CUDA_PATH"]) / "bin" / "nvcc")
    try:
        import nvidia  # namespace package of NVIDIA's PyPI wheels

        candidates += [Path(p) / "cu13" / "bin" / "nvcc" for p in nvidia.__path__]
    except ImportError:
        pass
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(Path(on_path))
    for nvcc in candidates:
        if nvcc.is_file() and os.access(nvcc, os.X_OK):
            return nvcc
    raise UserError(f"compiling for a CUDA preset needs the CUDA compiler (nvcc), which was not found; {INSTALL_HINT}")


COMPILE_HOOK = "tvm_callback_cuda_compile"  # where TVM's CUDA runtime is enabled, builds compile kernels with it


@contextmanager
def cuda_compiled_here(arch: str) -> Iterator[None]:
    """Builds inside compile their GPU kernels with :func:`compile_fatbin` for ``arch`` wherever TVM compiles
    them at build time (a machine with a GPU); elsewhere TVM keeps them as source. The hook in place before (a
    loaded bundle's precompiled kernels, say) is put back after."""
    hook = tvm_ffi.get_global_func(COMPILE_HOOK, allow_missing=True)
    tvm_ffi.register_global_func(COMPILE_HOOK, lambda source, *_: compile_fatbin(source, arch), override=True)
    try:
        yield
    finally:
        if hook is not None:
            tvm_ffi.register_global_func(COMPILE_HOOK, hook, override=True)
        else:
            tvm_ffi.remove_global_func(COMPILE_HOOK)


def cuda_source(executable: tvm.runtime.Executable) -> str:
    """The CUDA C source of ``executable``'s GPU kernels (TVM's CUDA module)."""
    pending = [executable.mod]
    while pending:
        module = pending.pop()
        if module.kind == "cuda":
            return module.inspect_source("cuda")
        pending += list(module.imports)
    raise ValueError("the executable has no CUDA module")


@functools.lru_cache(maxsize=4)  # a build on a GPU machine compiles its kernels, then the bundle asks again
def compile_fatbin(source: str, arch: str) -> bytes:
    """``source`` compiled by nvcc for ``arch`` (e.g. ``sm_90``): a fatbin with that architecture's SASS and its
    PTX."""
    number = arch.removeprefix("sm_")
    return _nvcc(source, "fatbin", ["-gencode", f"arch=compute_{number},code=[sm_{number},compute_{number}]"])


def compile_ptx(source: str, arch: str) -> str:
    """``source`` compiled by nvcc to PTX for ``arch`` (the instructions the tests look for)."""
    return _nvcc(source, "ptx", [f"-arch={arch}"]).decode()


def _nvcc(source: str, output: str, arch_flags: list[str]) -> bytes:
    """``source`` compiled by nvcc to ``output`` (``fatbin`` or ``ptx``) for the architecture ``arch_flags`` name."""
    nvcc = find_nvcc()
    with tempfile.TemporaryDirectory(prefix="int8mt-nvcc-") as work:
        src, out = Path(work) / "kernels.cu", Path(work) / f"kernels.{output}"
        src.write_text(source)
        cmd = [str(nvcc), f"--{output}", *NVCC_FLAGS, *arch_flags, "-o", str(out), str(src)]
        env = {**os.environ, "PATH": f"{nvcc.parent}:{os.environ.get('PATH', '')}"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed on the generated CUDA kernels ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
        return out.read_bytes()
