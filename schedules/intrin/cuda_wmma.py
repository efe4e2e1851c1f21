"""Our CUDA ``wmma`` tensor intrinsics for int8 x int8 -> int32 on 16x16x16 fragments (sm_72 and newer).

Five intrinsics: fill an accumulator with zeros, load A (row-major) and B (stored ``[n, k]``, i.e. read
column-major) from shared memory into fragments, multiply-accumulate ``C[i, j] += A[i, k] * B[j, k]``, and
store the accumulator to shared memory between two barriers. The loads and the store come in one set per
shared-memory scope (static ``shared``, or ``shared.dyn`` for pipelined tiles). TVM ships the same family in
``tvm.s_tir.tensor_intrin.cuda``, but that module registers hundreds of intrinsics on import (over a minute);
these are registered on first use.
"""
from __future__ import annotations

from tvm import tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T
from tvm.tirx import Buffer, Expr

FRAG = 16
NAMES = {"init": "int8mt_wmma_fill_s32", "load_a": "int8mt_wmma_load_s8_a_shared",
         "load_b": "int8mt_wmma_load_s8_b_trans_shared", "compute": "int8mt_wmma_sync_s8s8s32_trans",
         "store": "int8mt_wmma_store_s32_shared"}


def _fragment(buffer: Buffer, stride: Expr) -> Expr:
    """Index of the 16x16 fragment ``buffer`` starts at, in a fragment array of row stride ``stride``."""
    return buffer.elem_offset // stride // FRAG * (stride // FRAG) + buffer.elem_offset % stride // FRAG


def _copy_desc(dtype: str, source: str, destination: str, name: str) -> tirx.PrimFunc:
    """What a fragment load or store computes: a 16x16 copy from the ``source`` scope to the ``destination`` one."""

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (FRAG, FRAG), dtype, align=64, offset_factor=FRAG, scope=source)
        C = T.match_buffer(c, (FRAG, FRAG), dtype, align=64, offset_factor=FRAG, scope=destination)
        with T.sblock("root"):
            T.reads(A[0:FRAG, 0:FRAG])
            T.writes(C[0:FRAG, 0:FRAG])
            for i, j in T.grid(FRAG, FRAG):
                with T.sblock(name):
                    vi, vj = T.axis.remap("SS", [i, j])
                    C[vi, vj] = A[vi, vj]

    return desc


def _load(shared: str, scope: str, layout: str) -> tuple:
    @T.prim_func(s_tir=True)
    def impl(a: T.handle, c: T.handle) -> None:
        s1, s0, d1, d0 = T.int32(), T.int32(), T.int32(), T.int32()
        A = T.match_buffer(a, (FRAG, FRAG), "int8", align=64, offset_factor=FRAG, scope=shared, strides=[s1, s0])
        C = T.match_buffer(c, (FRAG, FRAG), "int8", align=64, offset_factor=FRAG, scope=scope, strides=[d1, d0])
        with T.sblock("root"):
            T.reads(A[0:FRAG, 0:FRAG])
            T.writes(C[0:FRAG, 0:FRAG])
            T.evaluate(T.tvm_load_matrix_sync(C.data, FRAG, FRAG, FRAG, _fragment(C, d1),
                                              A.access_ptr("r", ptr_type="int8"), s1, layout, dtype="void"))

    return _copy_desc("int8", shared, scope, "load"), impl


@T.prim_func(s_tir=True)
def _fill_desc(c: T.handle) -> None:
    C = T.match_buffer(c, (FRAG, FRAG), "int32", align=64, offset_factor=FRAG, scope="wmma.accumulator")
    with T.sblock("root"):
        T.reads()
        T.writes(C[0:FRAG, 0:FRAG])
        for i, j in T.grid(FRAG, FRAG):
            with T.sblock("init"):
                vi, vj = T.axis.remap("SS", [i, j])
                C[vi, vj] = 0


@T.prim_func(s_tir=True)
def _fill_impl(c: T.handle) -> None:
    d1, d0 = T.int32(), T.int32()
    C = T.match_buffer(c, (FRAG, FRAG), "int32", align=64, offset_factor=FRAG, scope="wmma.accumulator",
                       strides=[d1, d0])
    with T.sblock("root"):
        T.reads()
        T.writes(C[0:FRAG, 0:FRAG])
        T.evaluate(T.tvm_fill_fragment(C.data, FRAG, FRAG, FRAG, _fragment(C, d1), T.float32(0), dtype="void"))


def _store(shared: str) -> tuple:
    @T.prim_func(s_tir=True)
    def impl(a: T.handle, c: T.handle) -> None:
        s1, s0, d1, d0 = T.int32(), T.int32(), T.int32(), T.int32()
        A = T.match_buffer(a, (FRAG, FRAG), "int32", align=64, offset_factor=FRAG, scope="wmma.accumulator",
                           strides=[d1, d0])
        C = T.match_buffer(c, (FRAG, FRAG), "int32", align=64, offset_factor=FRAG, scope=shared, strides=[s1, s0])
        with T.sblock("root"):
            T.reads(A[0:FRAG, 0:FRAG])
            T.writes(C[0:FRAG, 0:FRAG])
            # The staging may reuse the memory of the A and B tiles (TVM's storage rewrite, or the merged dynamic
            # shared memory), which other warps may still be reading, and the epilogue reads what every warp
            # stored. Element addresses, not access pointers: the staging may be an int8 buffer's memory, whose
            # typed access pointer TVM rejects; the thread-sync pass does not see such writes, so the
            # barriers are explicit.
            T.evaluate(T.tvm_storage_sync("shared"))
            T.evaluate(T.tvm_store_matrix_sync(A.data, FRAG, FRAG, FRAG, _fragment(A, d1),
                                               T.address_of(C[0, 0]), s1, "row_major", dtype="void"))
            T.evaluate(T.tvm_storage_sync("shared"))

    return _copy_desc("int32", "wmma.accumulator", shared, "store"), impl


@T.prim_func(s_tir=True)
def _sync_desc(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (FRAG, FRAG), "int8", align=64, offset_factor=FRAG, scope="wmma.matrix_a")
    B = T.match_buffer(b, (FRAG, FRAG), "int8", align=64, offset_factor=FRAG, scope="wmma.matrix_b")
    C = T.match_buffer(c, (FRAG, FRAG), "int32", align=64, offset_factor=FRAG, scope="wmma.accumulator")
    with T.sblock("root"):
        T.reads(C[0:FRAG, 0:FRAG], A[0:FRAG, 0:FRAG], B[0:FRAG, 0:FRAG])
        T.writes(C[0:FRAG, 0:FRAG])
        for i, j, k in T.grid(FRAG, FRAG, FRAG):
            with T.sblock(""):
                vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                C[vi, vj] = C[vi, vj] + T.Cast("int32", A[vi, vk]) * T.Cast("int32", B[vj, vk])


@T.prim_func(s_tir=True)
def _sync_impl(a: T.handle, b: T.handle, c: T.handle) -> None:
    a1, a0, b1, b0, c1, c0 = T.int32(), T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
    A = T.match_buffer(a, (FRAG, FRAG), "int8", align=64, offset_factor=FRAG, scope="wmma.matrix_a",
                       strides=[a1, a0])
    B = T.match_buffer(b, (FRAG, FRAG), "int8", align=64, offset_factor=FRAG, scope="wmma.matrix_b",
                       strides=[b1, b0])
    C = T.match_buffer(c, (FRAG, FRAG), "int32", align=64, offset_factor=FRAG, scope="wmma.accumulator",
                       strides=[c1, c0])
    with T.sblock("root"):
        T.reads(C[0:FRAG, 0:FRAG], A[0:FRAG, 0:FRAG], B[0:FRAG, 0:FRAG])
        T.writes(C[0:FRAG, 0:FRAG])
        T.evaluate(T.tvm_mma_sync(C.data, _fragment(C, c1), A.data, _fragment(A, a1), B.data, _fragment(B, b1),
                                  C.data, _fragment(C, c1), dtype="void"))


def wmma_s8_intrinsics(shared: str = "shared") -> dict[str, str]:
    """The names of our wmma int8 intrinsics by role (``init``, ``load_a``, ``load_b``, ``compute``, ``store``)
    for tiles staged in ``shared`` (``shared`` or ``shared.dyn``), registered on first call."""
    names = {role: name.replace("_shared", "_" + shared.replace(".", "_")) for role, name in NAMES.items()}
    if TensorIntrin.get(names["load_a"], allow_missing=True) is None:
        if TensorIntrin.get(names["init"], allow_missing=True) is None:
            TensorIntrin.register(names["init"], _fill_desc, _fill_impl)
            TensorIntrin.register(names["compute"], _sync_desc, _sync_impl)
        TensorIntrin.register(names["load_a"], *_load(shared, "wmma.matrix_a", "row_major"))
        TensorIntrin.register(names["load_b"], *_load(shared, "wmma.matrix_b", "col_major"))
        TensorIntrin.register(names["store"], *_store(shared))
    return names
