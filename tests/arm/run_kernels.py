"""Run kernels on (emulated) aarch64: ``python run_kernels.py JOBS.json``. Each job names a library, a function, a
``.npz`` of its arguments (``arr_0``, ``arr_1``, ..., as ``np.savez`` names them), the indices of the arguments it writes and where to save
them. Needs only NumPy and TVM's FFI and runtime library (no int8mt, no TVM compiler)."""
import ctypes
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import tvm_ffi

ctypes.CDLL(str(Path(importlib.util.find_spec("tvm").origin).parent / "lib" / "libtvm_runtime.so"), ctypes.RTLD_GLOBAL)
modules = {}
for job in json.loads(Path(sys.argv[1]).read_text()):
    if job["library"] not in modules:
        modules[job["library"]] = tvm_ffi.load_module(job["library"])
    data = np.load(job["inputs"])
    args = [np.ascontiguousarray(data[f"arr_{i}"]) for i in range(len(data.files))]
    modules[job["library"]][job["function"]](*(tvm_ffi.from_dlpack(a) for a in args))
    np.savez(job["result"], *(args[i] for i in job["outputs"]))
print("ran", len(json.loads(Path(sys.argv[1]).read_text())), "jobs")
