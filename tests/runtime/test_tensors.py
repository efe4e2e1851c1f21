import gc

import numpy as np

from int8mt.runtime import tensors
from int8mt.runtime.bundle import import_tvm_ffi
from int8mt.runtime.tensors import MappedFile, read_int64, tensor_functions, write_int64


def test_a_mapped_file_s_regions_are_tensors_of_its_bytes_copied_on_write(tmp_path):
    """Each region is a tensor of the file's bytes at its offset (data pointer there, no byte offset), written
    copy-on-write (the file keeps its bytes); the mapping's records go when the last tensor does, the mapping
    object itself long gone."""
    ffi = import_tvm_ffi()
    values = np.arange(48, dtype=np.float32)
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x07" * 64 + values.tobytes())
    before = len(tensors._EXPORTED)
    mapped = MappedFile(path)
    first = mapped.tensor(ffi, (4, 3, 4), ffi.dtype("float32"), 64)
    head = mapped.tensor(ffi, (64,), ffi.dtype("int8"), 0)
    del mapped
    gc.collect()
    assert first.shape == (4, 3, 4) and first.dtype == "float32" and first.data_ptr() % 64 == 0
    np.testing.assert_array_equal(np.from_dlpack(first), values.reshape(4, 3, 4))
    np.testing.assert_array_equal(np.from_dlpack(head), np.full(64, 7, np.int8))
    np.from_dlpack(first)[0, 0, 0] = -1.0
    assert np.from_dlpack(first)[0, 0, 0] == -1.0 and path.read_bytes()[64:] == values.tobytes()
    assert len(tensors._EXPORTED) == before + 2
    del first, head
    gc.collect()
    assert len(tensors._EXPORTED) == before


def test_int64_values_go_into_and_come_out_of_tensors():
    ffi = import_tvm_ffi()
    alloc = tensor_functions(ffi)[2]
    tensor = alloc(ffi.Shape((2, 3)), ffi.dtype("int64"), ffi.device("cpu", 0), "global")
    values = [5, -1, 1 << 40, 0, 7, -(1 << 62)]
    assert write_int64(tensor, values) is tensor
    assert read_int64(tensor, 6) == values and read_int64(tensor, 2) == values[:2]
    np.testing.assert_array_equal(np.from_dlpack(tensor), np.array(values).reshape(2, 3))
