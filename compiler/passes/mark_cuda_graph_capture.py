"""MarkCUDAGraphCapture: marks the decoder step so that TVM's ``RewriteCUDAGraph`` replays its kernels as CUDA graphs.

A decoder step launches some 45 kernels, and on a GPU the host's time to issue them (about 1 ms a step at 156 calls)
bounds the translation speed, not the kernels. ``RewriteCUDAGraph`` (run when the pass context sets
``relax.backend.use_cuda_graph``) lifts each run of kernel calls that read only weights and buffers the function
allocates itself into a function that the virtual machine captures into a CUDA graph at its first call and replays
at the next ones (``vm.builtin.cuda_graph.run_or_capture``): one launch for the run. It needs to know, and this pass
states on the step:

* which parameters are weights (``num_input``: the others), whose memory stays put from call to call
  (:class:`~.LiftWeights` made them the trailing parameters);
* an upper bound of the rows (``tir_var_upper_bound``), so that the memory planner allocates every buffer whose
  size depends on them once, at that size (``vm.builtin.cuda_graph.get_cached_alloc``), at the same address for
  every call, as a replayed graph needs;
* that the rows may differ between calls (``relax.rewrite_cuda_graph.capture_symbolic_vars``): a graph is captured
  for each row count seen and replayed for that count.

Kernels that read the step's inputs (the embedding of its tokens, the attentions and the appends of its caches) or
write its outputs (the logits) stay launches of their own between the graphs.
"""
from __future__ import annotations

import tvm

from .lift_weights import WEIGHT_PARAMS_ATTR

ROWS_PARAM = "tokens"  # the decoder step's parameter whose first axis is its rows (sentences x beams)


@tvm.transform.module_pass(opt_level=0, name="MarkCUDAGraphCapture")
class MarkCUDAGraphCapture:
    """See the module doc; ``max_rows``: the most rows a call of ``entry_point`` takes (the bundle's ``max_rows``,
    which the runtime checks)."""

    def __init__(self, max_rows: int, entry_point: str = "decode_step") -> None:
        self.max_rows, self.entry_point = max_rows, entry_point

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        gvar = mod.get_global_var(self.entry_point)
        func = mod[gvar]
        attrs = func.attrs or {}
        params = {param.name: param for param in func.params}
        if WEIGHT_PARAMS_ATTR not in attrs or ROWS_PARAM not in params:
            raise ValueError(f"{self.entry_point} has no lifted weights or no {ROWS_PARAM!r} parameter: run "
                             "LiftWeights first, on a decoder step as the frontend exports it")
        rows = params[ROWS_PARAM].ty.shape[0]
        if not isinstance(rows, tvm.tirx.Var):
            return mod  # a fixed row count: nothing varies between calls
        bounds = {name: int(bound) for name, bound in attrs.get("tir_var_upper_bound", {}).items()}
        mod[gvar] = func.with_attrs({
            "num_input": len(func.params) - int(attrs[WEIGHT_PARAMS_ATTR]),
            "tir_var_upper_bound": {**bounds, rows.name: self.max_rows},
            "relax.rewrite_cuda_graph.capture_symbolic_vars": [rows.name],
        })
        return mod
