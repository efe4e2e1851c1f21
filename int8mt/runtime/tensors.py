"""TVM tensors on the host without NumPy: a mapped file's regions as tensors, int64 tensors written from and read
into Python lists, and TVM's functions that view, copy and allocate tensors.

Loading a CPU bundle and translating one sentence at a time with its greedy loop need nothing more, so a process
that does only that never imports NumPy (11 MiB resident with TVM's FFI); the searches that batch sentences or
keep beams import it (:mod:`int8mt.runtime.search`).
"""
from __future__ import annotations

import ctypes
import functools
import mmap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TENSOR_ALIGNMENT = 64  # bytes: TVM's kernels assume their buffers start at such an address
CPU_DEVICE_TYPE = 1  # DLPack's kDLCPU


@functools.lru_cache(maxsize=None)
def tensor_functions(ffi: Any) -> tuple[Any, Any, Any]:
    """TVM's functions that make a view of a tensor, copy one and allocate one, looked up once per process (for
    bundles and for every new cache: one per sentence at batch 1)."""
    return tuple(ffi.get_global_func(f"runtime.TVMTensor{name}")
                 for name in ("CreateView", "CopyFromTo", "AllocWithScope"))  # type: ignore[return-value]


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    pass


_Deleter = ctypes.CFUNCTYPE(None, ctypes.POINTER(_DLManagedTensor))
_DLManagedTensor._fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", _Deleter)]

_EXPORTED: dict[int, tuple[Any, ...]] = {}  # address of an exported DLManagedTensor -> what it needs alive (one
# dict operation each, atomic under the GIL: a lock could deadlock when a garbage collection inside it frees a tensor)


@_Deleter
def _release(managed: Any, exported: dict = _EXPORTED, address: Any = ctypes.addressof) -> None:
    """DLPack's deleter of :func:`_tensor_at`'s tensors: TVM calls it when the last reference to one is gone."""
    exported.pop(address(managed.contents), None)


_capsule = ctypes.pythonapi.PyCapsule_New
_capsule.restype, _capsule.argtypes = ctypes.py_object, (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)


class MappedFile:
    """A file (not empty) mapped copy-on-write, whose regions become CPU tensors without a copy: pages are read
    from the file as kernels touch them and shared with every process that maps it. The mapping lives as long as
    a tensor of it does."""

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as f:
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self._data = (ctypes.c_char * len(mapping)).from_buffer(mapping)  # (which keeps ``mapping`` open)

    def tensor(self, ffi: Any, shape: tuple[int, ...], dtype: Any, offset: int) -> Any:
        """The ``dtype`` (a TVM dtype) tensor of ``shape`` at byte ``offset`` (which the caller checked lies in
        the file)."""
        return _tensor_at(ffi, ctypes.addressof(self._data) + offset, (CPU_DEVICE_TYPE, 0), shape, dtype, self._data)


def view_at(ffi: Any, tensor: Any, shape: tuple[int, ...], dtype: Any, offset: int) -> Any:
    """A ``dtype`` tensor of ``shape`` at byte ``offset`` of ``tensor``'s memory (CPU or CUDA, where addresses add
    up), which it keeps alive; the caller checks that it lies inside. TVM's kernels want their data pointer there:
    they refuse a view with a byte offset, which is what TVM's own views have."""
    device = tensor.device
    return _tensor_at(ffi, tensor.data_ptr() + offset, (device.dlpack_device_type(), device.index), shape, dtype,
                      tensor)


def _tensor_at(ffi: Any, address: int, device: tuple[int, int], shape: tuple[int, ...], dtype: Any,
               owner: Any) -> Any:
    """The ``dtype`` tensor of ``shape`` whose data is at ``address`` on ``device`` (DLPack's type and index),
    keeping ``owner`` (what holds that memory) alive as long as it lives."""
    dims = (ctypes.c_int64 * len(shape))(*shape)
    managed = _DLManagedTensor(_DLTensor(address, _DLDevice(*device), len(shape),
                                         _DLDataType(dtype.type_code, dtype.bits, dtype.lanes), dims, None, 0),
                               None, _release)
    _EXPORTED[ctypes.addressof(managed)] = (managed, dims, owner)
    return ffi.from_dlpack(_capsule(ctypes.addressof(managed), b"dltensor", None))


def write_int64(tensor: Any, values: Sequence[int]) -> Any:
    """``values`` written into the first elements of ``tensor`` (int64, on the CPU); returns ``tensor``."""
    (ctypes.c_int64 * len(values)).from_address(tensor.data_ptr())[:] = values
    return tensor


def read_int64(tensor: Any, count: int) -> list[int]:
    """The first ``count`` elements of ``tensor`` (int64, on the CPU)."""
    return (ctypes.c_int64 * count).from_address(tensor.data_ptr())[:]
