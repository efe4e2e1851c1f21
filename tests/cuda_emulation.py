"""Runs one kernel of TVM's generated CUDA C (:func:`kernel_cuda_source`) on this CPU, for tests on machines
without a GPU: the kernel's body compiled as C++ (g++), each thread block's threads as OS threads with a barrier
for ``__syncthreads`` and for the warp shuffles, the blocks one after another (so a block's ``__shared__`` arrays
are the kernel's static arrays). It covers what TVM's row, attention, top-k and int8 tensor-core kernels use:
shared and dynamic shared memory, barriers, ``__shfl_down_sync`` reductions, thread blocks of one or two
dimensions, ``nvcuda::wmma`` fragments (the warp's first thread holds each whole fragment and does the warp's
loads, products and stores) and ``cp.async`` copies (done at once: a wait finds them done). It checks the kernels'
index arithmetic, barriers and reductions, not the GPU's timing, memory model or a missing wait for a copy."""
from __future__ import annotations

import ctypes
import hashlib
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
#include <type_traits>
struct Index3 { unsigned x = 0, y = 0, z = 0; };
static thread_local Index3 threadIdx, blockIdx, blockDim;
static std::barrier<>* block_barrier;
static uint64_t shuffle_slots[1024];
alignas(64) static unsigned char dynamic_shared[1 << 18];
#define __global__
#define __launch_bounds__(n)
#define __align__(n) alignas(n)
#define __syncthreads() block_barrier->arrive_and_wait()
#define CUDART_INF_F INFINITY
#define CUDART_INF INFINITY
typedef unsigned int uint;
typedef unsigned char uchar;
#define VECTOR4(name, type, align) \
  struct alignas(align) name { type x, y, z, w; }; \
  static name make_##name(type x, type y, type z, type w) { return {x, y, z, w}; }
VECTOR4(char4, signed char, 4)
VECTOR4(int4, int, 16)
VECTOR4(float4, float, 16)
VECTOR4(longlong4, long long, 32)
static unsigned thread_rank() { return threadIdx.x + blockDim.x * threadIdx.y; }
static unsigned __activemask() { return 0xffffffffu; }
template <class T> static T __shfl_down_sync(unsigned, T v, int offset, int width) {
  unsigned t = thread_rank();
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
namespace nvcuda::wmma {  // each fragment whole in the warp's first thread, which does the warp's operations
struct matrix_a {}; struct matrix_b {}; struct accumulator {}; struct row_major {}; struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
template <class Use, int M, int N, int K> struct extent { static constexpr int rows = M, cols = N; };
template <int M, int N, int K> struct extent<matrix_a, M, N, K> { static constexpr int rows = M, cols = K; };
template <int M, int N, int K> struct extent<matrix_b, M, N, K> { static constexpr int rows = K, cols = N; };
template <class Use, int M, int N, int K, class T, class Layout = void> struct fragment {
  static constexpr int rows = extent<Use, M, N, K>::rows, cols = extent<Use, M, N, K>::cols;
  T x[rows * cols];  // element (r, c) at r * cols + c
};
static bool leads_warp() { return thread_rank() % 32 == 0; }
template <class F, class V> static void fill_fragment(F& f, V v) {
  if (leads_warp()) for (auto& e : f.x) e = decltype(f.x[0] + 0)(v);
}
template <class U, int M, int N, int K, class T, class L, class P>
static void load_matrix_sync(fragment<U, M, N, K, T, L>& f, const P* p, unsigned ldm) {
  using F = fragment<U, M, N, K, T, L>;
  if (leads_warp())
    for (int r = 0; r < F::rows; ++r)
      for (int c = 0; c < F::cols; ++c)
        f.x[r * F::cols + c] = std::is_same_v<L, col_major> ? p[c * ldm + r] : p[r * ldm + c];
}
template <int M, int N, int K, class T, class A, class B, class C, class D>
static void mma_sync(fragment<accumulator, M, N, K, D>& d, const fragment<matrix_a, M, N, K, T, A>& a,
                     const fragment<matrix_b, M, N, K, T, B>& b, const fragment<accumulator, M, N, K, C>& c) {
  if (!leads_warp()) return;
  D out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      D sum = c.x[i * N + j];
      for (int k = 0; k < K; ++k) sum += D(a.x[i * K + k]) * D(b.x[k * N + j]);
      out[i * N + j] = sum;
    }
  std::memcpy(d.x, out, sizeof(out));
}
template <int M, int N, int K, class T, class P>
static void store_matrix_sync(P* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout) {
  if (leads_warp())
    for (int r = 0; r < M; ++r)
      for (int c = 0; c < N; ++c) p[layout == mem_row_major ? r * ldm + c : c * ldm + r] = f.x[r * N + c];
}
}  // namespace nvcuda::wmma
"""
_ASYNC_COPY = re.compile(r"__forceinline__ __device__ void (\w+)\(void\* dst, int dst_off, void\* src, int src_off\) "
                         r"\{[^}]*cp\.async\.c[ag]\.shared\.global \[%0\], \[%1\], %2;\"[^}]*\"n\"\((\d+)\)\);\s*\}")
_ASYNC_GROUP = re.compile(r"__forceinline__ __device__ void (\w+)\(\) \{\s*asm volatile\(\"cp\.async\."
                          r"(?:wait|commit)_group[^}]*\}")


def _helpers(source: str) -> str:
    """The source's ``cp.async`` helper functions as C++: a copy done at once, a group's commit and wait no-ops;
    any other ``cp.async`` use (a predicated or zero-filling copy) is refused."""
    copies = [f"static void {name}(void* dst, int dst_off, void* src, int src_off) "
              f"{{ std::memcpy((char*)dst + dst_off, (char*)src + src_off, {size}); }}"
              for name, size in _ASYNC_COPY.findall(source)]
    groups = [f"static void {name}() {{}}" for name in _ASYNC_GROUP.findall(source)]
    if source.count("cp.async.") != len(copies) + len(groups):
        raise NotImplementedError("a cp.async form the emulation does not know")
    return "\n".join(copies + groups) + "\n"



def kernel_cuda_source(func: tvm.tirx.PrimFunc, name: str, rule: dlight.ScheduleRule | None = None,
                       preset_name: str = "cuda-sm90") -> str:
    """The CUDA C of ``func`` (named ``name``; its kernel ``{name}_kernel``) for the CUDA preset ``preset_name``,
    scheduled by ``rule`` (none for a function written as its threads' code)."""
    preset = get_preset(preset_name)
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


def emulated_kernel(source: str, name: str, workdir: Path, block: tuple[int, int] | None = None):
    """``run(grid, **arguments)``: kernel ``name`` of the CUDA C ``source`` compiled for this CPU, thread blocks of
    ``block`` ``(x, y)`` threads (default: the kernel's launch bound along x); ``grid`` ``(x, y)`` or ``(x, y, z)``
    blocks; arguments by the kernel's parameter names (NumPy arrays for pointers, ints for the rest)."""
    body, params, threads = _kernel_text(source, name)
    block_x, block_y = block or (threads, 1)
    if block_x * block_y != threads:
        raise ValueError(f"a block of {block_x} x {block_y} threads for a kernel bound to {threads}")
    signature = ", ".join(f"{t} {n}" for t, n in params)
    names = ", ".join(n for _, n in params)
    cpp = _PRELUDE + _helpers(source) + f"""
static void kernel({signature}) {{{body}}}
extern "C" void launch(unsigned grid_x, unsigned grid_y, unsigned grid_z, {signature}) {{
  for (unsigned bz = 0; bz < grid_z; ++bz)
   for (unsigned by = 0; by < grid_y; ++by)
    for (unsigned bx = 0; bx < grid_x; ++bx) {{
      std::barrier<> barrier({threads});
      block_barrier = &barrier;
      std::vector<std::thread> pool;
      for (unsigned ty = 0; ty < {block_y}; ++ty)
        for (unsigned tx = 0; tx < {block_x}; ++tx)
          pool.emplace_back([=] {{
            threadIdx = {{tx, ty, 0}}; blockDim = {{{block_x}, {block_y}, 1}}; blockIdx = {{bx, by, bz}};
            kernel({names});
          }});
      for (auto& thread : pool) thread.join();
    }}
}}
"""
    stem = workdir / f"{name}_{hashlib.sha1(cpp.encode()).hexdigest()[:12]}"  # (dlopen keeps a path's first library)
    stem.with_suffix(".cpp").write_text(cpp)
    library = stem.with_suffix(".so")
    built = subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-ffp-contract=off",
                            "-o", str(library), str(stem.with_suffix(".cpp"))], capture_output=True, text=True)
    if built.returncode:
        raise RuntimeError(f"g++ could not compile the emulated kernel {stem}.cpp:\n{built.stderr[-3000:]}")
    launch = ctypes.CDLL(str(library)).launch

    def run(grid: tuple[int, ...], **arguments) -> None:
        values = [ctypes.c_uint(extent) for extent in (*grid, 1, 1)[:3]]
        for ctype, param in params:
            value = arguments[param.removesuffix("_ptr")]
            if "*" in ctype:
                assert isinstance(value, np.ndarray) and value.flags.c_contiguous
                values.append(ctypes.c_void_p(value.ctypes.data))
            else:
                values.append(ctypes.c_int64(int(value)) if "int64" in ctype else ctypes.c_int(int(value)))
        launch(*values)

    return run
