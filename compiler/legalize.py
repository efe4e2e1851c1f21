"""How the pipeline legalizes Relax ops into TIR (phase 3): TVM's legalization with our choices for softmax,
exp, sigmoid, gathers and reshapes, and for a CUDA target the GPU's kernels of beam search's candidates and
choice. Also used where a pass turns a part of the graph into one function of the ops' own TIR
(:class:`~.passes.AttentionRows`), so that it computes what the graph would."""
from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import relax, topi

from int8mt.schedules.beam_select import BEAM_SELECT, beam_select_kernel
from int8mt.schedules.top_candidates import CANDIDATES_ATTR, TOP_CANDIDATES, top_candidates_kernel


def _keep_reshape(_bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    return call


def _fast_softmax(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """Softmax with TOPI's ``fast_exp`` (range reduction and a polynomial: plain arithmetic, within ~5e-7 of
    the probabilities here) instead of a call to the C library's ``expf`` per element: the short rows of attention
    scores are dominated by the exponentials."""
    return bb.call_te(topi.nn.fast_softmax, call.args[0], int(call.attrs.axis))


def _fast_exp(bb: relax.BlockBuilder, call: relax.Expr) -> relax.Expr:
    """``exp`` of float32 with TOPI's ``fast_exp`` (arithmetic that vectorizes; the log-sum-exp of
    ``top_candidates``), other dtypes as TVM legalizes them."""
    if str(call.ty.dtype) == "float32":
        return bb.call_te(topi.fast_exp, call.args[0])
    return _DEFAULT_LEGALIZE["relax.exp"](bb, call)


def _fast_sigmoid(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """``sigmoid`` of float32 as ``1 / (1 + fast_exp(-x))`` (swish, the FFN activation of OPUS-MT models: with the
    C library's ``expf`` per element it took 60 µs of a 2.7 ms decoder step per layer at batch 32), other dtypes
    as TVM legalizes them."""
    if str(call.ty.dtype) != "float32":
        return _DEFAULT_LEGALIZE["relax.sigmoid"](bb, call)
    return bb.call_te(lambda x: topi.divide(1.0, topi.add(1.0, topi.fast_exp(topi.negative(x)))), call.args[0],
                      primfunc_name_hint="fast_sigmoid")


INJECTIVE = 2  # TVM's OpPatternKind kInjective


def _fusable_gather(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """``take`` as TVM legalizes it, marked injective when it gathers along a tensor of indices: TVM's pattern
    analysis calls any load through an index tensor opaque, which keeps the gather out of fusion. The decoder
    step's keys and values are such a gather from the cache's rows followed by a ``where`` that takes the new
    position from the new key (:meth:`int8mt.model.transformer.Transformer.decode_step`): fused, one kernel
    reads the past keys once and writes them once. A take in TVM's ``fast`` mode (the graph's default) is
    legalized in ``clip`` mode: the same for indices in range (the runtime checks source ids and computes
    positions and beams), no read outside the tensor for one that is not, and no warning at every compilation
    ("Fast mode segfaults when there are out-of-bounds indices")."""
    if str(call.attrs.mode) == "fast":
        call = bb.normalize(relax.op.take(*call.args, axis=call.attrs.axis, mode="clip"))
    out = _DEFAULT_LEGALIZE["relax.take"](bb, call)
    if call.args[1].ty.ndim >= 1 and isinstance(out, relax.Call) and out.op == tvm.ir.Op.get("relax.call_tir"):
        kernel = out.args[0]
        bb.update_func(kernel, bb.get()[kernel].with_attr("op_pattern", INJECTIVE))
    return out


_DEFAULT_LEGALIZE = {name: tvm.ir.Op.get(name).get_attr("FLegalize")
                     for name in ("relax.exp", "relax.sigmoid", "relax.take")}


def legalize_map() -> dict[str, Callable]:
    """Our legalizations, where they differ from TVM's: softmax and sigmoid use ``fast_exp``, gathers may fuse
    with their consumers (:func:`_fusable_gather`) and reshapes stay ``R.reshape`` (a view
    of the same memory at run time): legalized into copy kernels they are turned back into views only where TVM
    can prove the copy is the identity, which fails for dynamic shapes such as the decoder's cache rows (a copy of
    the whole cache every step)."""
    return {"relax.reshape": _keep_reshape, "relax.nn.softmax": _fast_softmax, "relax.exp": _fast_exp,
            "relax.sigmoid": _fast_sigmoid, "relax.take": _fusable_gather}


_GPU_KERNELS: dict[str, Callable[[tvm.tirx.PrimFunc], tvm.tirx.PrimFunc]] = {
    BEAM_SELECT: lambda _cpu: beam_select_kernel(gpu=True),
    TOP_CANDIDATES: lambda cpu: top_candidates_kernel(int(cpu.attrs[CANDIDATES_ATTR]), gpu=True),
}


@tvm.transform.module_pass(opt_level=0, name="GPUKernels")
def _gpu_kernels(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """For a CUDA target, the GPU's kernels of beam search's candidates and choice in place of the CPU's that the
    frontend builds (``top_candidates``, ``select_beams``: :mod:`int8mt.schedules.top_candidates`,
    :mod:`int8mt.schedules.beam_select`)."""
    from .passes.kernel_calls import kernel_kind  # (here: the passes' package imports this module)

    target = tvm.target.Target.current()
    if target is None or target.kind.name != "cuda":
        return mod
    for gv, kind in [(gv, kernel_kind(mod, gv)) for gv in mod.functions]:
        if kind in _GPU_KERNELS:
            mod[gv] = _GPU_KERNELS[kind](mod[gv])
    return mod


def legalize_passes() -> list[tvm.transform.Pass]:
    """TVM's legalization (``cpu_generic.legalize_passes``; the CUDA backend's before its schedules) with
    :func:`legalize_map` and the GPU's kernels of beam search (:func:`_gpu_kernels`), then constant folding and
    operator fusion."""
    return [relax.transform.LegalizeOps(legalize_map()), _gpu_kernels,
            relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(), relax.transform.FuseOps(),
            relax.transform.FuseTIR()]
