"""FuseAttentionEpilogue: the elementwise ops after a one-query attention product, computed in its kernel.

Runs after :class:`.OneQueryAttention`. With static ranges a product's int32 sums are followed by what Scale
Propagation made of its consumer, as after a linear layer: the scores' dequantization (``astype(float32) *
scale`` after a reshape into ``[batch, heads, 1, positions]``), the context's requantization for the output
projection (``astype(int64) * multiplier + rounding >> shift``, clip, ``astype(int8)``, through the views that
merge the heads). Unfused, each is a kernel of its own and, at a small batch, the virtual machine's allocations
and views around it cost as much as its work. Here such a chain (found as :class:`.FuseDenseEpilogue` finds a
dense kernel's, each op written as the TIR its legalization produces: the same values bit for bit) becomes the
kernel's epilogue (:mod:`int8mt.schedules.one_query_attention`): the gathered scores', the gathered and direct
contexts' and the direct scores', whose chain may also add the cross-attention's mask. Chains that read any other
tensor are left alone, as are products of run-time ranges (their kernels quantize and dequantize already).
"""
from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import relax, tirx

from int8mt.schedules.int8_dense import DenseEpilogue
from int8mt.schedules.kernel_attrs import ATTENTION_ATTR, KERNEL_ATTR
from int8mt.schedules.one_query_attention import (context_kernel, direct_context_kernel, direct_scores_kernel,
                                                  scores_kernel)

from .fuse_dense_epilogue import DenseKernels, EpilogueChain, fuse_epilogues
from .kernel_calls import kernel_kind

_KERNELS: dict[str, Callable[[dict, DenseEpilogue], tirx.PrimFunc]] = {
    "gathered_scores": lambda a, e: scores_kernel(a["heads"], a["head_dim"], a["dtype"], a["lanes"], e,
                                                  a["pair"] or None),
    "gathered_context": lambda a, e: context_kernel(a["heads"], a["head_dim"], a["dtype"], e),
    "direct_context": lambda a, e: direct_context_kernel(a["head_dim"], a["dtype"], e),
    "direct_scores": lambda a, e: direct_scores_kernel(a["head_dim"], a["dtype"], a["lanes"], e, a["pair"] or None),
}
_READS_A_TENSOR = ("direct_scores",)  # kernels whose epilogue may read one more tensor (the mask)


class _AttentionKernels(DenseKernels):
    def chain_for(self, mod: tvm.IRModule, call: relax.Call, result: relax.Var,
                  products: dict[relax.Var, relax.Call]) -> EpilogueChain | None:
        if kernel_kind(mod, call.args[0]) not in _KERNELS:
            return None
        pairs, _, width = result.ty.shape  # [pairs, 1, positions or head_dim]: the sums as rows of a matrix
        return EpilogueChain([pairs, width], str(result.ty.dtype))

    def accepts(self, mod: tvm.IRModule, call: relax.Call, chain: EpilogueChain) -> bool:
        """A chain that computes, reads no other tensor (the direct scores: at most one), and whose output's and
        that tensor's shapes name every size its positions depend on (the kernel learns them from those
        buffers)."""
        most = 1 if kernel_kind(mod, call.args[0]) in _READS_A_TENSOR else 0
        if not chain.computes or len(chain.operands) > most:
            return False
        dims = [dim for x in (chain.output, *chain.operands) for dim in x.ty.shape]
        named = {dim.name for dim in dims if isinstance(dim, tirx.Var)}
        plain = all(isinstance(dim, (tirx.IntImm, tirx.Var)) for dim in dims)
        return plain and all(var.name in named for var in chain.epilogue().shape_vars)

    def kernel(self, mod: tvm.IRModule, call: relax.Call,
               chain: EpilogueChain) -> tuple[tirx.PrimFunc, str, list[relax.Expr], list[tirx.PrimExpr]]:
        func = mod[call.args[0]]
        kind = str(func.attrs[KERNEL_ATTR])
        attrs = {key: value if isinstance(value, str) else int(value)
                 for key, value in func.attrs[ATTENTION_ATTR].items()}
        fused = _KERNELS[kind](attrs, chain.epilogue()).with_attr(KERNEL_ATTR, kind).with_attr(ATTENTION_ATTR, attrs)
        return (fused, f"{call.args[0].name_hint}_to_{chain.output.ty.dtype}", [*call.args[1].fields, *chain.operands],
                [])


@tvm.transform.module_pass(opt_level=0, name="int8mt.FuseAttentionEpilogue")
class FuseAttentionEpilogue:
    """Every one-query attention kernel call of static ranges followed by a chain of elementwise ops -> one call
    of that kernel with the chain as its epilogue (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return fuse_epilogues(mod, _AttentionKernels())
