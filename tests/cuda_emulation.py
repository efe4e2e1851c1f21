"""Runs one kernel of TVM's generated CUDA C (:func:`kernel_cuda_source`) on this CPU, for tests on machines
without a GPU: the kernel's body compiled as C++ (g++), each thread block's threads as OS threads with a barrier
for ``__syncthreads`` and for the warp shuffles, the blocks one after another (so a block's ``__shared__`` arrays
are the kernel's static arrays). It covers what TVM's row, attention and top-k kernels use (shared and dynamic
shared memory, barriers, ``__shfl_down_sync`` reductions, one-dimensional thread blocks), not tensor-core or
asynchronous-copy kernels."""
from __future__ import annotations

import ctypes
import re
import subprocess
from pathlib import Path

import numpy as np
import tvm
from tvm.s_tir import dlight

from int8mt.compiler.cuda import cuda_compiled_here, cuda_source
from int8mt.targets import get_preset

_PRELUDE = r"""
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
struct Index3 { unsigned x = 0, y = 0, z = 0; };
static thread_local Index3 threadIdx, blockIdx;
static std::barrier<>* block_barrier;
static uint64_t shuffle_slots[1024];
alignas(64) static unsigned char dynamic_shared[1 << 16];
#define __global__
#define __launch_bounds__(n)
#define __align__(n) alignas(n)
#define __syncthreads() block_barrier->arrive_and_wait()
#define CUDART_INF_F INFINITY
typedef unsigned int uint;
static unsigned __activemask() { return 0xffffffffu; }
template <class T> static T __shfl_down_sync(unsigned, T v, int offset, int width) {
  unsigned t = threadIdx.x;
  std::memcpy(&shuffle_slots[t], &v, sizeof(T));
  __syncthreads();
  unsigned source = (t % width) + offset < unsigned(width) ? t + offset : t;
  T out;
  std::memcpy(&out, &shuffle_slots[source], sizeof(T));
  __syncthreads();
  return out;
}
static float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static float max(float a, float b) { return fmaxf(a, b); }
static float min(float a, float b) { return fminf(a, b); }
template <class T> static T max(T a, T b) { return a < b ? b : a; }
template <class T> static T min(T a, T b) { return b < a ? b : a; }
"""


def kernel_cuda_source(func: tvm.tirx.PrimFunc, name: str, rule: dlight.ScheduleRule | None = None) -> str:
    """The CUDA C of ``func`` (named ``name``; its kernel ``{name}_kernel``) for cuda-sm90, scheduled by ``rule``
    (none for a function written as its threads' code)."""
    preset = get_preset("cuda-sm90")
    mod = tvm.IRModule({name: func.with_attr("global_symbol", name)})
    if rule is not None:
        with tvm.target.Target(preset.target):
            mod = dlight.ApplyDefaultSchedule(rule)(mod)
    with cuda_compiled_here(preset.target["arch"]):
        return cuda_source(tvm.compile(mod, target=tvm.target.Target(preset.target)))


def _kernel_text(source: str, name: str) -> tuple[str, list[tuple[str, str]], int]:
    """The definition of kernel ``name`` in ``source`` made C++, its parameters (type, name) and its threads per
    block."""
    head = re.search(r'extern "C" __global__ void __launch_bounds__\((\d+)\) ' + name + r"\(([^)]*)\) \{",
                     source)
    threads, params = int(head.group(1)), head.group(2)
    body = source[head.end():]
    body = body[:body.rindex("}")]
    body = re.sub(r"extern __shared__ __align__\(\d+\) ([\w ]+?) (\w+)\[\];",
                  r"\1* \2 = reinterpret_cast<\1*>(dynamic_shared);", body)
    body = re.sub(r"__shared__ (alignas\(\d+\)) ", r"\1 static ", body)  # one block at a time: static arrays
    parsed = []
    for param in params.split(","):
        words = param.replace("__restrict__", "").split()
        parsed.append((" ".join(words[:-1]), words[-1]))
    return body, parsed, threads


def emulated_kernel(source: str, name: str, workdir: Path):
    """``run(grid, **arguments)``: kernel ``name`` of the CUDA C ``source`` compiled for this CPU; ``grid``
    ``(x, y)`` blocks; arguments by the kernel's parameter names (NumPy arrays for pointers, ints for the rest)."""
    body, params, threads = _kernel_text(source, name)
    signature = ", ".join(f"{t} {n}" for t, n in params)
    names = ", ".join(n for _, n in params)
    cpp = _PRELUDE + f"""
static void kernel({signature}) {{{body}}}
extern "C" void launch(unsigned grid_x, unsigned grid_y, {signature}) {{
  for (unsigned by = 0; by < grid_y; ++by)
    for (unsigned bx = 0; bx < grid_x; ++bx) {{
      std::barrier<> barrier({threads});
      block_barrier = &barrier;
      std::vector<std::thread> pool;
      for (unsigned tx = 0; tx < {threads}; ++tx)
        pool.emplace_back([=] {{ threadIdx.x = tx; blockIdx.x = bx; blockIdx.y = by; kernel({names}); }});
      for (auto& thread : pool) thread.join();
    }}
}}
"""
    (workdir / f"{name}.cpp").write_text(cpp)
    library = workdir / f"{name}.so"
    subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-ffp-contract=off",
                    "-o", str(library), str(workdir / f"{name}.cpp")], check=True, capture_output=True, text=True)
    launch = ctypes.CDLL(str(library)).launch

    def run(grid: tuple[int, int], **arguments) -> None:
        values = [ctypes.c_uint(grid[0]), ctypes.c_uint(grid[1])]
        for ctype, param in params:
            value = arguments[param.removesuffix("_ptr")]
            if "*" in ctype:
                assert isinstance(value, np.ndarray) and value.flags.c_contiguous
                values.append(ctypes.c_void_p(value.ctypes.data))
            else:
                values.append(ctypes.c_int64(int(value)) if "int64" in ctype else ctypes.c_int(int(value)))
        launch(*values)

    return run
