"""TVM's CUDA graph builtins for a virtual machine on this CPU, for tests on machines without a GPU: a library built
with CUDA graphs (``relax.backend.use_cuda_graph``) for the CPU runs with a replay that is as strict as a graph's.

``vm.builtin.cuda_graph.get_cached_alloc`` runs its allocation once per virtual machine and returns the same
storage after. ``vm.builtin.cuda_graph.run_or_capture`` runs the captured function at the first call of each
(function, symbolic values) key, as TVM's does before it captures; at the next ones it runs it again on the
arguments of that first call, as a graph replays the kernels with the pointers it captured, returns the first
call's results, and fails where a later call hands it other memory: a graph would read and write the memory of its
capture there."""
from __future__ import annotations

from typing import Any

import tvm
import tvm_ffi

RUN_OR_CAPTURE = "vm.builtin.cuda_graph.run_or_capture"
CACHED_ALLOC = "vm.builtin.cuda_graph.get_cached_alloc"


def _memory(value: Any) -> Any:
    """What a graph captures of an argument: a tensor's address and shape, a storage object itself, a value."""
    if isinstance(value, tvm.runtime.Tensor):
        return ("tensor", value.data_ptr(), tuple(value.shape))
    if isinstance(value, tvm.runtime.Object):
        return ("object", value.__hash__())
    return ("value", value)


class EmulatedCUDAGraphs:
    """Registers the two builtins while in a ``with`` block (restoring any that were registered before);
    ``captures`` and ``replays`` count the captured functions' first runs and their replays. A virtual machine is
    known by its address: those that run in the block must stay alive in it (a new one at a freed one's address
    would find the graphs of the old one)."""

    def __init__(self) -> None:
        self.captures = self.replays = 0
        self._graphs: dict[tuple, tuple[list, list, Any]] = {}  # (vm, index, values) -> args, memory, results
        self._allocs: dict[tuple, Any] = {}
        self._invoke = tvm.get_global_func("vm.builtin.invoke_closure")
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> EmulatedCUDAGraphs:
        for name, func in ((RUN_OR_CAPTURE, self._run_or_capture), (CACHED_ALLOC, self._cached_alloc)):
            self._saved[name] = tvm_ffi.get_global_func(name, allow_missing=True)
            tvm_ffi.register_global_func(name, func, override=True)
        return self

    def __exit__(self, *_exc: object) -> None:
        for name, saved in self._saved.items():
            if saved is None:
                tvm_ffi.remove_global_func(name)
            else:
                tvm_ffi.register_global_func(name, saved, override=True)

    def _run_or_capture(self, vm: Any, func: Any, args: Any, index: int, values: Any = None) -> Any:
        key = (vm.value, int(index), tuple(values) if values is not None else ())
        args = list(args)
        memory = [_memory(arg) for arg in args]
        if key not in self._graphs:
            self.captures += 1
            self._graphs[key] = (args, memory, self._invoke(vm, func, *args))
            return self._graphs[key][2]
        captured_args, captured_memory, results = self._graphs[key]
        changed = [i for i, (now, then) in enumerate(zip(memory, captured_memory)) if now != then]
        assert not changed, (f"captured function {index} at {key[2]} is handed other memory than at its capture "
                             f"(arguments {changed}): a CUDA graph would replay on the captured memory")
        self.replays += 1
        self._invoke(vm, func, *captured_args)
        return results

    def _cached_alloc(self, vm: Any, func: Any, index: int) -> Any:
        key = (vm.value, int(index))
        if key not in self._allocs:
            self._allocs[key] = self._invoke(vm, func)
        return self._allocs[key]
