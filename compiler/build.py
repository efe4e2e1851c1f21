"""Build a bundle: ``tvm.compile`` + ``export_library`` to a ``.so``, the tokenizer's files and a manifest."""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import tvm

from int8mt import __version__
from int8mt.errors import UserError
from int8mt.model.checkpoint import check_model_dir, load_model_dir
from int8mt.quant.config import QuantConfig
from int8mt.runtime.cuda import KERNELS_FILE, KERNELS_SOURCE_FILE, source_digest
from int8mt.runtime.bundle import (BUNDLE_FORMAT, ENTRY_POINTS, GREEDY_ENTRY_POINT, LIBRARY_FILE, MANIFEST_FILE,
                                   REPORT_FILE, WEIGHTS_FILE, sha256)
from int8mt.runtime.tensors import TENSOR_ALIGNMENT
from int8mt.targets import TargetPreset
from int8mt.tokenizer import load_tokenizer

from .cross import library_linker
from .frontend import ExportConfig, candidates_per_row
from .passes import LiftWeights
from .pipeline import CompileOptions, compile_model, tile_choosers
from .quant_report import untuned_kernels_warning


def build_bundle(model_dir: Path, preset: TargetPreset, out_dir: Path, dump_dir: Path | None = None,
                 qcfg: QuantConfig | None = None, data_dir: Path | None = None, calib_sentences: int = 512,
                 database: Path | None = None, calib_data: Path | None = None, cuda_graphs: bool = False) -> dict:
    """Compile the model in ``model_dir`` for ``preset`` into the bundle ``out_dir``; with ``qcfg``,
    quantized (ranges per ``qcfg.ranges``; calibration reads ``calib_data``, else ``data_dir``). On presets with an int8
    dot-product intrinsic, int8 linear layers use the tuned kernels of ``database``, and FP32 linear layers its
    float32 ones (default: the database shipped for the preset; kernels it lacks get default tiles). With
    ``cuda_graphs``, the decoder step's kernels are replayed as CUDA graphs (:class:`~.passes.MarkCUDAGraphCapture`;
    CUDA presets, or a CPU one whose runtime provides the graph builtins, as tests do)."""
    check_output_dir(out_dir)
    check_model_dir(model_dir)
    linker = library_linker(preset)  # before compiling: a missing cross compiler is known now
    tokenizer = load_tokenizer(model_dir)  # a bundle needs one to translate text; fail before compiling
    tiles, float_tiles = tile_choosers(preset, database)
    tiles = tiles if qcfg is not None else None
    if qcfg is None:
        model = load_model_dir(model_dir)
    else:
        from int8mt.quant.checkpoint import quantized_model

        print(f"quantizing to {qcfg.name} with {qcfg.ranges} ranges", file=sys.stderr)
        model = quantized_model(model_dir, qcfg, data_dir, calib_sentences=calib_sentences, calib_data=calib_data)
    t0 = time.time()
    print(f"compiling for {preset.name} ({json.dumps(preset.target)})", file=sys.stderr)
    compiled = compile_model(model, CompileOptions(preset, qcfg, tiles, dump_dir=dump_dir, float_tiles=float_tiles,
                                                   cuda_graphs=cuda_graphs))
    report = compiled.report
    final_dir, out_dir = out_dir, _staging_dir(out_dir)
    library = out_dir / LIBRARY_FILE
    compiled.executable.export_library(str(library), fcompile=linker)
    cuda = _write_cuda_kernels(compiled.executable, preset, out_dir) if preset.device == "cuda" else None
    weights = _write_weights(compiled.weights, out_dir / WEIGHTS_FILE)
    for file in tokenizer.files:
        shutil.copyfile(file, out_dir / file.name)
    manifest = {
        "format": BUNDLE_FORMAT,
        "int8mt_version": __version__,
        "tvm_version": tvm.__version__,
        "target": {"preset": preset.name, "tvm": preset.target, "arch": preset.arch,
                   "required_features": list(preset.required_features)},
        "quantization": _quantization_record(qcfg, report),
        "entry_points": list(entry_points(compiled.weights)),
        "model": model.cfg.to_dict(),
        "cache_dtype": model.cache_dtype_name,
        "cache_scales": model.cache_scales,
        "top_candidates": candidates_per_row(model),
        "max_rows": ExportConfig().max_batch,  # rows (sentences x beams) one call of an entry point takes
        "cuda_graphs": cuda_graphs,  # the decoder step's kernels replayed as CUDA graphs
        "tokenizer": tokenizer.kind,
        "weights": weights,
        "files": {LIBRARY_FILE: sha256(library), WEIGHTS_FILE: sha256(out_dir / WEIGHTS_FILE),
                  **{f.name: sha256(out_dir / f.name) for f in tokenizer.files}},
        "compile_seconds": round(time.time() - t0, 1),
    }
    if cuda is not None:
        manifest["cuda"] = cuda
        manifest["files"].update({name: sha256(out_dir / name) for name in (KERNELS_FILE, KERNELS_SOURCE_FILE)})
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    _publish(out_dir, final_dir)
    for kind, key in (("int8", "kernels"), ("float32", "float_kernels")):
        warning = untuned_kernels_warning(report.get(key, []), preset.name, final_dir, linker is not None, kind)
        if warning:
            print(warning, file=sys.stderr)
    print(f"wrote {final_dir} ({(final_dir / LIBRARY_FILE).stat().st_size / 1e6:.1f} MB .so) in "
          f"{manifest['compile_seconds']} s", file=sys.stderr)
    return manifest


def _write_weights(weights: LiftWeights, path: Path) -> dict:
    """The lifted weights into ``path``, each at a multiple of ``TENSOR_ALIGNMENT`` bytes (so the runtime hands
    TVM views of the mapped file); the manifest's ``weights`` record: each tensor's dtype, shape and offset, and
    each entry point's weights (its trailing parameters, in order)."""
    tensors = []
    with open(path, "wb") as f:
        for array in weights.weights:
            f.write(b"\0" * (-f.tell() % TENSOR_ALIGNMENT))
            tensors.append({"dtype": str(array.dtype), "shape": list(array.shape), "offset": f.tell()})
            f.write(array.tobytes())
    return {"tensors": tensors, "entry_points": {name: weights.uses.get(name, []) for name in entry_points(weights)}}


def entry_points(weights: LiftWeights) -> tuple[str, ...]:
    """The library's entry points: those every bundle has, and the greedy loop where the pipeline added it."""
    return ENTRY_POINTS + tuple(name for name in (GREEDY_ENTRY_POINT,) if name in weights.uses)


def _write_cuda_kernels(executable: tvm.runtime.Executable, preset: TargetPreset, out_dir: Path) -> dict:
    """The GPU kernels compiled with nvcc into ``out_dir/kernels.fatbin``, their CUDA source beside it (to read or
    profile them); the manifest's ``cuda`` record."""
    from .cuda import compile_fatbin, cuda_source

    source = cuda_source(executable)
    arch = preset.target["arch"]
    kernels = set(re.findall(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)", source))
    print(f"compiling {len(kernels)} GPU kernels for {arch} with nvcc", file=sys.stderr)
    (out_dir / KERNELS_FILE).write_bytes(compile_fatbin(source, arch))
    (out_dir / KERNELS_SOURCE_FILE).write_text(source)
    return {"arch": arch, "compute_capability": list(preset.compute_capability),
            "source_sha256": source_digest(source)}


def check_output_dir(out_dir: Path) -> None:
    """``out_dir`` may receive a bundle: it is new, empty, or an earlier bundle (which is replaced)."""
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_FILE).is_file():
        raise UserError(f"{out_dir} exists and is not a bundle (no {MANIFEST_FILE}); compiling would replace its "
                         "files: choose a new or empty folder")


def _staging_dir(out_dir: Path) -> Path:
    """A fresh folder beside ``out_dir`` for the bundle being written (same file system: renaming is atomic)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def _publish(staging: Path, out_dir: Path) -> None:
    """Move the complete bundle in ``staging`` to ``out_dir``: an earlier bundle there is renamed away first and
    removed after, so the folder holds the old bundle or the new one, never a mix (a process that has the old
    library loaded keeps its file)."""
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        os.rename(out_dir, old)
    os.rename(staging, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _quantization_record(qcfg: QuantConfig | None, report: dict) -> dict:
    graph = report.get("after", report["before"])["total"]
    matmuls = graph.get("matmul_int", 0) + graph.get("matmul_float", 0)
    record = {"scheme": "fp32" if qcfg is None else qcfg.name, "matmuls_int": graph.get("matmul_int", 0),
              "matmuls": matmuls}
    if qcfg is not None:
        record.update(ranges=qcfg.ranges, keep_fp32=list(qcfg.fp32_patterns), integer_softmax=qcfg.integer_softmax,
                      integer_layer_norm=qcfg.integer_layer_norm,
                      calibration=qcfg.calibration if qcfg.ranges == "calibrate" else None)
    return record
