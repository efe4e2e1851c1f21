"""The int8mt compilation pipeline, handed to ``tvm.compile(relax_pipeline=...)``.

Phases, each logged, and with ``dump_dir`` the IR after each written as ``phaseN-<name>.py``:
1. import     the Relax module from :mod:`.frontend` (FP32 in this release; quantization slots in here);
2. legalize   library dispatch, a cache's layer slices as views (``TakeAsView``), ops -> TIR, constant
              folding, operator fusion;
3. schedule   the default parallel/vectorized CPU schedule for every kernel (``schedules.cpu_generic``);
4. lower      dataflow lowering, memory planning and VM finalisation for the target.
"""
from __future__ import annotations

import sys
from pathlib import Path

import tvm
from tvm import relax, topi
from tvm.relax.backend.cpu_generic import pipeline as cpu
from tvm.s_tir import dlight

from int8mt.schedules.cpu_generic import CPUGeneric
from int8mt.schedules.top_k import top_k_kernel

from .passes.take_as_view import TakeAsView


def _phase(index: int, name: str, dump_dir: Path | None) -> tvm.transform.Pass:
    """A no-op pass that logs the start of a phase and dumps the IR it receives."""

    @tvm.transform.module_pass(opt_level=0, name=f"int8mt.phase{index}")
    def _mark(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        print(f"phase {index}: {name}", file=sys.stderr)
        if dump_dir is not None:
            dump_dir.mkdir(parents=True, exist_ok=True)
            (dump_dir / f"phase{index}-{name}.py").write_text(mod.script(show_meta=False))
        return mod

    return _mark


def _keep_reshape(_bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    return call


def _fast_softmax(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """Softmax with TOPI's ``fast_exp`` (range reduction and a polynomial: plain arithmetic, within ~5e-7 of
    the probabilities here) instead of a call to the C library's ``expf`` per element: 1.4x faster for rows
    of 20-33 keys, never slower."""
    return bb.call_te(topi.nn.fast_softmax, call.args[0], int(call.attrs.axis))


def _fast_exp(bb: relax.BlockBuilder, call: relax.Expr) -> relax.Expr:
    """``exp`` of float32 with TOPI's ``fast_exp`` (arithmetic that vectorizes; the log-sum-exp of
    ``top_candidates``), other dtypes as TVM legalizes them."""
    if str(call.ty.dtype) == "float32":
        return bb.call_te(topi.fast_exp, call.args[0])
    return _DEFAULT_LEGALIZE["relax.exp"](bb, call)


def _top_k(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """The ``k`` largest entries along the last axis of a 2-D tensor (both results, descending) with our
    kernel (:mod:`int8mt.schedules.top_k`: rows in parallel, no sort). TVM has no legalization of its own
    for ``topk``; the graphs we build use only this form."""
    attrs, data = call.attrs, call.args[0]
    if not (data.ty.ndim == 2 and int(attrs.axis) in (-1, 1) and bool(attrs.largest) and attrs.ret_type == "both"
            and str(data.ty.dtype) in ("float32", "float64")):
        raise ValueError(f"topk is compiled only for the largest entries of a 2-D float tensor along its last axis "
                         f"(values and indices); got {call}")
    kernel = bb.add_func(top_k_kernel(int(attrs.k), str(data.ty.dtype), str(attrs.dtype)), "top_k")
    return relax.call_tir(kernel, [data], list(call.ty.fields))


_DEFAULT_LEGALIZE = {"relax.exp": tvm.ir.Op.get("relax.exp").get_attr("FLegalize")}


def _legalize_passes(target: tvm.target.Target) -> list[tvm.transform.Pass]:
    """TVM's CPU legalization (``cpu_generic.legalize_passes``), except that softmax uses ``fast_exp`` and
    reshapes stay ``R.reshape`` (a view of the same memory at run time): legalized into copy kernels they are
    turned back into views only where TVM can prove the copy is the identity, which fails for dynamic shapes
    such as the decoder's growing cache, and those copies took a fifth of a decoder step."""
    del target  # the same passes for every CPU target, as in cpu_generic.legalize_passes
    custom = {"relax.reshape": _keep_reshape, "relax.nn.softmax": _fast_softmax, "relax.exp": _fast_exp,
              "relax.topk": _top_k}
    return [relax.transform.LegalizeOps(custom),
            relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(), relax.transform.FuseOps(),
            relax.transform.FuseTIR()]


def int8mt_pipeline(target: tvm.target.Target, dump_dir: Path | None = None) -> tvm.transform.Pass:
    """The whole Relax pipeline for ``target`` (an LLVM CPU target)."""
    if target.kind.name != "llvm":
        raise ValueError(f"target kind {target.kind.name!r} is not supported yet; use a CPU (llvm) preset")

    @tvm.transform.module_pass(opt_level=0, name="int8mt.pipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(
                [_phase(1, "import", dump_dir)]
                + cpu.library_dispatch_passes(target) + [TakeAsView()] + _legalize_passes(target)
                + [_phase(2, "legalized", dump_dir), dlight.ApplyDefaultSchedule(CPUGeneric())]
                + [_phase(3, "scheduled", dump_dir)]
                + cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target)
                + [_phase(4, "lowered", dump_dir)]
            )(mod)

    return _pipeline
