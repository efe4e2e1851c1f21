"""The one compile pipeline of int8mt: a model, a target preset and options in, a TVM executable and a
report of what the passes did out. ``int8mt compile``, ``int8mt verify`` and ``int8mt tune`` all go
through it; a new target adds a preset, intrinsics and schedules, not a call site.

Phases (each logged; with ``dump_dir`` the IR each produces is written as ``phaseN-<name>.py``):

0. ``import``            torch.export -> Relax (:mod:`.frontend`); a quantized model's matmuls carry
                         quantize/dequantize ops (:mod:`.quant_import`).
1. ``scale-propagated``  quantized models: :class:`~.passes.ScalePropagation` (integers flow between
                         ops); with ``tap_matmuls``, :class:`~.passes.TapIntMatmuls` (verification).
2. ``kernels``           :class:`~.passes.DropIdentityBroadcast`; the preset's dense kernels:
                         :class:`~.passes.PackDense` (int8 for quantized models, float32 multiply-adds for FP32
                         layers), :class:`~.passes.FoldDenseBias`; quantized models: :class:`~.passes.Int8BatchMatmul`;
                         :class:`~.passes.ReadKeysAsStored`, :class:`~.passes.GatherPackedRows`,
                         :class:`~.passes.FuseDenseEpilogue`; on CPUs :class:`~.passes.OneQueryAttention` and
                         :class:`~.passes.FuseAttentionEpilogue`,
                         :class:`~.passes.LayerNormRows` (with the quantization after each layer norm),
                         :class:`~.passes.SoftmaxRows` (with the quantization or scaling after a softmax) and
                         :class:`~.passes.QuantizeRows` (run-time ranges); :class:`~.passes.UnitPermuteAsReshape`;
                         on GPUs, for quantized models, :class:`~.passes.LayerNormRows` with the graph's ops (a
                         layer norm and the quantizations of its result one kernel), :class:`~.passes.QuantizeRows`
                         with the graph's ops (each run-time row quantization one kernel),
                         :class:`~.passes.QuantizeOnce` (a tensor's static quantizations one kernel) and
                         :class:`~.passes.AppendQuantizedRows` (the cache's appends quantize the step's new keys
                         and values themselves), then
                         :class:`~.passes.ReadKeysAsStored` and :class:`~.passes.ReshapesAfterElementwise` (a linear
                         layer's requantization or dequantization fuses with its matmul, a mask add with its scores);
                         then ``FuseTransposeMatmul``.
3. ``legalized``         library dispatch, :class:`~.passes.TakeAsView`, ops -> TIR (fast softmax and exp,
                         our top-k), constant folding, operator fusion.
4. ``scheduled``         the preset's schedules for every kernel not scheduled yet (:func:`default_schedules`);
                         :class:`~.passes.UnitReshapeIntoKernels` (kernels read the tensors behind reshapes that only
                         add or drop axes of size 1) and :class:`~.passes.ViewsIntoKernels` (the parameters behind
                         views, at their offsets).
5. ``lowered``           :class:`~.passes.LiftWeights`, on CPUs :class:`~.passes.GreedyLoop` (one sentence's greedy
                         search in one call), with CUDA graphs :class:`~.passes.MarkCUDAGraphCapture`; dataflow
                         lowering, memory planning (with CUDA graphs TVM's ``RewriteCUDAGraph``) and VM
                         finalisation (the weights' checks left to ``check_weights``:
                         :func:`~.passes.drop_weight_checks`).

On CPUs the entry points' virtual-machine code is compiled to native code (``exec_mode="compiled"``) instead of
interpreted: a decoder step runs some 800 shape, allocation and kernel calls, and at batch 1 their dispatch was
about a sixth of the step (docs/benchmarks.md).
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu
from tvm.relax.backend.cuda import pipeline as cuda
from tvm.s_tir import dlight

from int8mt.compiler.cuda import cuda_compiled_here
from int8mt.errors import UserError
from int8mt.schedules.cpu_generic import FLOAT_BYTES, CPUGeneric, register_bytes
from int8mt.schedules.amx_blocks import load_blocks
from int8mt.schedules.database import TileChooser, TuningDatabase, shipped_database
from int8mt.schedules.int8_dense import default_tiles
from int8mt.schedules.intrin import batch_dot, dense_dot, int8_dot, pair_dot
from int8mt.targets import TargetPreset

from .legalize import legalize_passes
from .passes import (AppendQuantizedRows, AttentionRows, DropIdentityBroadcast, DropUnusedTuples, FoldDenseBias,
                     FuseAttentionEpilogue, FuseDenseEpilogue, GatherPackedRows, GreedyLoop, Int8BatchMatmul,
                     LayerNormRows, LiftWeights, MarkCUDAGraphCapture, OneQueryAttention, PackDense, QuantizeOnce,
                     QuantizeRows, ReadKeysAsStored,
                     ReshapesAfterElementwise, ReuseShapes, ReuseTensors, ScalePropagation, SoftmaxRows, TakeAsView,
                     TapIntMatmuls, UnitPermuteAsReshape, UnitReshapeIntoKernels, ViewsIntoKernels,
                     drop_weight_checks)
from .quant_report import attention_kernel_calls, dense_kernel_report, op_report

if TYPE_CHECKING:
    from int8mt.model.transformer import Transformer
    from int8mt.quant.config import QuantConfig


@dataclass(frozen=True)
class CompileOptions:
    """What to compile for: the target ``preset``; ``quant`` None for FP32; ``tiles`` for the int8 dense
    kernels and ``float_tiles`` for the float32 ones of FP32 layers (default: :func:`tile_choosers` with the
    shipped database); ``tap_matmuls`` returns every integer matmul's operands and result beside each output (``int8mt
    verify``); ``dump_dir`` gets each phase's IR; ``cuda_graphs``: the decoder step's kernels replayed as CUDA
    graphs (:class:`~.passes.MarkCUDAGraphCapture`)."""

    preset: TargetPreset
    quant: QuantConfig | None = None
    tiles: TileChooser | None = None
    tap_matmuls: bool = False
    dump_dir: Path | None = None
    float_tiles: TileChooser | None = None
    cuda_graphs: bool = False

    def with_tiles(self) -> CompileOptions:
        """These options with ``tiles`` and ``float_tiles`` set where the preset's kernels need them (the shipped
        database where None)."""
        wants_int8 = self.tiles is None and self.quant is not None and self.preset.int8_dot is not None
        if not wants_int8 and (self.float_tiles is not None or self.preset.float_dot is None):
            return self
        tiles, float_tiles = tile_choosers(self.preset, None)
        return replace(self, tiles=tiles if wants_int8 else self.tiles, float_tiles=self.float_tiles or float_tiles)


@dataclass
class CompiledModel:
    executable: tvm.runtime.Executable
    report: dict  # op counts before/after Scale Propagation, the dense kernels and their tiles
    weights: LiftWeights  # the entry points' weights, their trailing parameters


def tile_choosers(preset: TargetPreset, database: Path | None) -> tuple[TileChooser | None, TileChooser | None]:
    """Tiles for ``preset``'s int8 kernels and for its float32 kernels of FP32 layers (None where it has no such
    kernels) from ``database``; kernels it lacks from the database shipped for the preset (or for the preset it
    takes its tiles from), then default tiles; AMX blocks likewise. Each database is read once for both."""
    if preset.int8_dot is None and preset.float_dot is None:  # (CUDA presets: their own tile table)
        return None, None
    tuned = preset.tuned_preset
    folder = shipped_database(tuned.name)
    shipped = TuningDatabase(folder) if folder.is_dir() else None
    primary, fallback = (TuningDatabase(database), shipped) if database is not None else (shipped, None)
    tiles = float_tiles = None
    if preset.int8_dot is not None:
        # AMX kernels: the blocks searched into ``database`` and, for layers it lacks, those shipped for the preset
        amx_blocks = ({**load_blocks(shipped_database(preset.name)), **load_blocks(database)}
                      if int8_dot(preset.int8_dot).amx_tiles else None)
        tiles = TileChooser(primary, tuned.int8_dot, fallback=fallback, amx_blocks=amx_blocks)
    if preset.float_dot is not None:
        float_tiles = TileChooser(primary, tuned.float_dot, fallback=fallback)
    return tiles, float_tiles


def import_model(model: Transformer, options: CompileOptions) -> tvm.IRModule:
    """Phase 0: the model's entry points as a Relax module."""
    from .frontend import export_to_relax
    from .quant_import import quant_convert_map

    print("phase 0: import (torch.export, then Relax)", file=sys.stderr)
    mod = export_to_relax(model, convert_map=quant_convert_map if options.quant is not None else None)
    _dump(mod, 0, "import", options.dump_dir)
    return mod


def scale_propagated(mod: tvm.IRModule, options: CompileOptions) -> tvm.IRModule:
    """Phase 1 on an imported module: Scale Propagation (quantized models), taps if asked."""
    quant = options.quant
    if quant is not None:
        print("phase 1: scale-propagated", file=sys.stderr)
        mod = ScalePropagation(quant.integer_softmax, quant.integer_layer_norm, strict=True)(mod)
        if options.tap_matmuls:
            mod = TapIntMatmuls()(mod)
        _dump(mod, 1, "scale-propagated", options.dump_dir)
    return mod


def kernels(mod: tvm.IRModule, options: CompileOptions) -> tvm.IRModule:
    """Phase 2: the preset's dense kernels (int8 for quantized models, float32 multiply-adds for FP32 layers) and,
    for quantized models, its int8 attention kernels, then transposed operands read as stored (matmuls of
    activations, and the weights the kernels did not take)."""
    preset = options.preset
    int8_family = preset.int8_dot if options.quant is not None else None
    if options.quant is None and preset.float_dot is None:
        return mod
    print("phase 2: kernels", file=sys.stderr)
    options = options.with_tiles()
    if int8_family is not None or preset.float_dot is not None:
        mod = tvm.transform.Sequential(kernel_passes(options.tiles, int8_family, options.float_tiles,
                                                     preset.float_dot))(mod)
    if preset.device == "cpu":
        target = tvm.target.Target(preset.target)
        lanes, pair = register_bytes(target) // FLOAT_BYTES, pair_dot(target)
        mod = FuseAttentionEpilogue()(OneQueryAttention(lanes, pair.family if pair else None)(mod))
        mod = LayerNormRows(lanes)(mod)
        if options.quant is not None:
            mod = QuantizeRows()(SoftmaxRows(lanes)(mod))
    mod = UnitPermuteAsReshape()(mod)
    if preset.device != "cpu":
        if options.quant is not None:
            mod = AppendQuantizedRows()(QuantizeOnce()(QuantizeRows(graph_ops=True)(LayerNormRows(lanes=None)(mod))))
        mod = ReshapesAfterElementwise()(ReadKeysAsStored()(mod))
        if options.quant is not None:
            mod = AttentionRows()(mod)
    mod = relax.transform.FuseTransposeMatmul()(mod)
    _dump(mod, 2, "kernels", options.dump_dir)
    return mod


def integer_graph(mod: tvm.IRModule, options: CompileOptions) -> tvm.IRModule:
    """Phases 1 and 2 on an imported module."""
    return kernels(scale_propagated(mod, options), options)


def kernel_passes(tiles_for: Callable | None, family: str | None, float_tiles_for: Callable | None = None,
                  float_family: str | None = None) -> list[tvm.transform.Pass]:
    """Phase 2's passes, in order: for the int8 dot-product ``family`` (int8 linear layers with ``tiles_for``'s
    tiles, attention), for the float32 multiply-add ``float_family`` (FP32 linear layers with
    ``float_tiles_for``'s tiles, default ones where None), and those of every graph (identity broadcasts dropped,
    one-query products reading the keys as stored)."""
    dots = []
    if family is not None:
        dots.append((int8_dot(family), tiles_for))
    if float_family is not None:
        float_dot = dense_dot(float_family)
        dots.append((float_dot, float_tiles_for or (lambda n, k, _function: default_tiles(n, k, float_dot))))
    passes = [DropIdentityBroadcast()] + [PackDense(tiles, dot) for dot, tiles in dots] + [FoldDenseBias()]
    if family is not None:
        passes.append(Int8BatchMatmul(batch_dot(family)))
    return passes + [ReadKeysAsStored()] + [GatherPackedRows(dot) for dot, _ in dots] + [FuseDenseEpilogue()]


def compile_model(model: Transformer, options: CompileOptions) -> CompiledModel:
    """All phases: ``model`` compiled for ``options.preset``, with the report of what the passes did."""
    options = options.with_tiles()
    mod = import_model(model, options)
    report = {"before": op_report(mod)}
    mod = scale_propagated(mod, options)
    if options.quant is not None:
        report["after"] = op_report(mod)
    mod = kernels(mod, options)
    if options.quant is not None and options.preset.int8_dot is not None:
        report["kernels"] = dense_kernel_report(mod, options.tiles)
        report["attention_kernels"] = attention_kernel_calls(mod)
        report["attention_dot"] = batch_dot(options.preset.int8_dot).family
    if options.float_tiles is not None:
        report["float_kernels"] = dense_kernel_report(mod, options.float_tiles)
    from .frontend import ExportConfig

    weights = LiftWeights()
    greedy = GreedyLoop(model.cfg.decoder_start_id, model.cfg.eos_id, weights)
    graphs = MarkCUDAGraphCapture(ExportConfig().max_batch) if options.cuda_graphs else None
    return CompiledModel(compile_module(mod, options.preset, options.dump_dir, weights, greedy, graphs), report,
                         weights)


def compile_module(mod: tvm.IRModule, preset: TargetPreset, dump_dir: Path | None = None,
                   weights: LiftWeights | None = None, greedy: GreedyLoop | None = None,
                   graphs: MarkCUDAGraphCapture | None = None) -> tvm.runtime.Executable:
    """Phases 3-5: a Relax module (after phase 2) compiled for ``preset``; with ``weights``, the entry points
    take their weights as trailing parameters (see :class:`LiftWeights`); with ``greedy`` (built on ``weights``), a
    CPU library gets the greedy decoding loop (see :class:`GreedyLoop`); with ``graphs`` (after ``weights``), the
    decoder step's kernels are replayed as CUDA graphs (on a CPU target too, whose virtual machine then needs the
    graph builtins: tests emulate them)."""
    target = tvm.target.Target(preset.target)
    pipeline = relax_pipeline(target, dump_dir, weights, greedy, graphs)
    outer = tvm.transform.PassContext.current()  # kept, with the pipelined kernels' copies as cp.async on GPUs
    config = {**outer.config, "relax.backend.use_cuda_graph": graphs is not None}
    if target.kind.name != "cuda":
        with tvm.transform.PassContext(opt_level=outer.opt_level, config=config, instruments=list(outer.instruments)):
            return relax.build(mod, target=target, relax_pipeline=pipeline, exec_mode="compiled")
    with tvm.transform.PassContext(opt_level=outer.opt_level, config={**config, "tirx.use_async_copy": True},
                                   instruments=list(outer.instruments)), cuda_compiled_here(preset.target["arch"]):
        return tvm.compile(mod, target=target, relax_pipeline=pipeline)


def _dump(mod: tvm.IRModule, index: int, name: str, dump_dir: Path | None) -> None:
    if dump_dir is not None:
        dump_dir.mkdir(parents=True, exist_ok=True)
        (dump_dir / f"phase{index}-{name}.py").write_text(mod.script(show_meta=False))


def _phase(index: int, name: str, dump_dir: Path | None) -> tvm.transform.Pass:
    """A no-op pass that logs a phase and dumps the IR it receives (what the passes before it made)."""

    @tvm.transform.module_pass(opt_level=0, name=f"int8mt.phase{index}")
    def _mark(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        print(f"phase {index}: {name}", file=sys.stderr)
        _dump(mod, index, name, dump_dir)
        return mod

    return _mark


def default_schedules(target: tvm.target.Target) -> list[dlight.ScheduleRule]:
    """Phase 4's dlight rules for ``target``: our CPU rule; on CUDA our int8 tensor-core matmul, row kernels (layer
    norms with their quantizations, row quantizations) and the decoder step's attentions (a function it cannot
    schedule left to dlight's rules, which compute the same), then dlight's GPU rules for the rest (float matmuls,
    reductions such as softmax and other layer norms, elementwise kernels)."""
    if target.kind.name == "llvm":
        return [CPUGeneric()]
    from int8mt.schedules.cuda_attention_rows import CUDAAttentionRows
    from int8mt.schedules.cuda_int8_matmul import CUDAInt8Matmul
    from int8mt.schedules.cuda_rows import CUDARows
    from int8mt.schedules.cuda_tiles import shipped_tiles

    fallible = (CUDAAttentionRows(), dlight.gpu.Matmul(), dlight.gpu.GEMV(), dlight.gpu.Reduction(),
                dlight.gpu.GeneralReduction())
    arch = str(target.arch)
    return [CUDAInt8Matmul(tuned=shipped_tiles(arch), tuned_few_rows=shipped_tiles(arch, few_rows=True)), CUDARows(),
            *(_NotApplicableOnError(rule) for rule in fallible), dlight.gpu.Fallback()]


class _NotApplicableOnError(dlight.ScheduleRule):
    """A dlight rule that declines a function it fails on (dlight's GEMV analysis asserts on some of our kernels
    instead of returning None; our attention rule on a function unlike any it was made for), so that the next rule
    schedules it."""

    def __init__(self, rule: dlight.ScheduleRule) -> None:
        self.rule = rule

    def apply(self, func: tvm.tirx.PrimFunc, target: tvm.target.Target, tunable: bool) -> object:
        try:
            return self.rule.apply(func, target, tunable)
        except (AssertionError, RuntimeError, ValueError):
            return None


def _finalize_passes(backend: ModuleType, target: tvm.target.Target, graphs: bool) -> list[tvm.transform.Pass]:
    """The backend's finalization passes; with ``graphs`` on a CPU, TVM's ``RewriteCUDAGraph`` where the CUDA
    backend has it (after the memory planning)."""
    passes = backend.finalize_passes(target)
    if graphs and not any(p.info.name == "RewriteCUDAGraph" for p in passes):
        planned = next(i for i, p in enumerate(passes) if p.info.name == "StaticPlanBlockMemory")
        passes.insert(planned + 1, relax.transform.RewriteCUDAGraph())
    return passes


def relax_pipeline(target: tvm.target.Target, dump_dir: Path | None = None, weights: LiftWeights | None = None,
                   greedy: GreedyLoop | None = None, graphs: MarkCUDAGraphCapture | None = None) -> tvm.transform.Pass:
    """Phases 3-5 as ``tvm.compile``'s ``relax_pipeline`` for ``target`` (an LLVM CPU or a CUDA target); with
    ``weights``, the scheduled graph's weights become the entry points' trailing parameters, then on a CPU
    ``greedy`` adds its entry point; ``graphs`` marks the decoder step for ``RewriteCUDAGraph``, which rewrites it
    where the pass context sets ``relax.backend.use_cuda_graph``."""
    if graphs is not None and weights is None:
        raise ValueError("CUDA graphs replay kernels that read weights as parameters: they need LiftWeights")
    backends = {"llvm": cpu, "cuda": cuda}
    if target.kind.name not in backends:
        raise UserError(f"target kind {target.kind.name!r} is not supported; use a CPU (llvm) or CUDA preset")
    backend = backends[target.kind.name]

    @tvm.transform.module_pass(opt_level=0, name="int8mt.pipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(
                backend.library_dispatch_passes(target) + [TakeAsView()] + legalize_passes()
                + [_phase(3, "legalized", dump_dir), dlight.ApplyDefaultSchedule(*default_schedules(target))]
                + [UnitReshapeIntoKernels(), ViewsIntoKernels()]
                + [_phase(4, "scheduled", dump_dir)] + ([weights] if weights is not None else [])
                + ([greedy] if greedy is not None and weights is not None and target.kind.name == "llvm" else [])
                + ([graphs] if graphs is not None else [])
                + backend.dataflow_lower_passes(target) + _finalize_passes(backend, target, graphs is not None)
                + [ReuseShapes(), ReuseTensors(), DropUnusedTuples()]
                + ([drop_weight_checks] if weights is not None else []) + [_phase(5, "lowered", dump_dir)]
            )(mod)

    return _pipeline
