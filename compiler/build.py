"""Build a bundle: ``tvm.compile`` + ``export_library`` to a ``.so``, the tokenizer and a manifest."""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import tvm
from tvm import relax

from int8mt import __version__
from int8mt.model.checkpoint import check_model_dir, load_model_dir
from int8mt.quant.config import QuantConfig
from int8mt.runtime.bundle import (BUNDLE_FORMAT, ENTRY_POINTS, LIBRARY_FILE, MANIFEST_FILE, REPORT_FILE,
                                   TOKENIZER_FILE, sha256)
from int8mt.schedules.database import TileChooser, TuningDatabase, database_or_shipped
from int8mt.schedules.intrin import int8_dot
from int8mt.targets import TargetPreset, get_preset

from .frontend import candidates_per_row, export_to_relax
from .passes import PackInt8Matmul, ScalePropagation
from .pipeline import int8mt_pipeline
from .quant_import import quant_convert_map
from .quant_report import batched_kernel_calls, op_report


def build_bundle(model_dir: Path, target_name: str, out_dir: Path, dump_dir: Path | None = None,
                 qcfg: QuantConfig | None = None, data_dir: Path | None = None, calib_sentences: int = 512,
                 database: Path | None = None) -> dict:
    """Compile the model in ``model_dir`` for the target preset ``target_name`` into the bundle ``out_dir``;
    with ``qcfg``, quantized (ranges per ``qcfg.ranges``; calibration reads ``data_dir``). On presets with
    an int8 dot-product intrinsic, int8 linear layers use the tuned kernels of ``database`` (default: the
    database shipped for the preset; kernels it lacks get default tiles)."""
    preset = get_preset(target_name)
    check_model_dir(model_dir)
    tiles = tile_chooser(preset, database) if qcfg is not None else None
    if qcfg is None:
        model = load_model_dir(model_dir)
    else:
        from int8mt.quant.checkpoint import quantized_model

        print(f"quantizing to {qcfg.name} with {qcfg.ranges} ranges", file=sys.stderr)
        model = quantized_model(model_dir, qcfg, data_dir, calib_sentences=calib_sentences)
    tokenizer = Path(model_dir) / TOKENIZER_FILE
    if not tokenizer.is_file():
        raise ValueError(f"{model_dir} has no tokenizer ({TOKENIZER_FILE}); a bundle needs one to translate text")
    target = tvm.target.Target(preset.target)
    t0 = time.time()
    print("torch.export and import into Relax", file=sys.stderr)
    mod = export_to_relax(model, convert_map=quant_convert_map if qcfg is not None else None)
    report = {"before": op_report(mod)}
    if qcfg is not None:
        if dump_dir is not None:
            dump_dir.mkdir(parents=True, exist_ok=True)
            (dump_dir / "phase0-quantized-import.py").write_text(mod.script(show_meta=False))
        print("scale propagation", file=sys.stderr)
        mod = ScalePropagation(qcfg.integer_softmax, qcfg.integer_layer_norm)(mod)
        report["after"] = op_report(mod)
        mod = lower_integer_graph(mod, preset, tiles)
        if tiles is not None:
            report["kernels"] = list(tiles.kernels.values())
            report["attention_kernels"] = batched_kernel_calls(mod)
    print(f"compiling for {target_name} ({json.dumps(preset.target)})", file=sys.stderr)
    executable = tvm.compile(mod, target=target, relax_pipeline=int8mt_pipeline(target, dump_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    library = out_dir / LIBRARY_FILE
    executable.export_library(str(library))
    shutil.copyfile(tokenizer, out_dir / TOKENIZER_FILE)
    manifest = {
        "format": BUNDLE_FORMAT,
        "int8mt_version": __version__,
        "tvm_version": tvm.__version__,
        "target": {"preset": preset.name, "tvm": preset.target, "required_features": list(preset.required_features)},
        "quantization": _quantization_record(qcfg, report),
        "entry_points": list(ENTRY_POINTS),
        "model": model.cfg.to_dict(),
        "cache_dtype": model.cache_dtype_name,
        "top_candidates": candidates_per_row(model),
        "files": {LIBRARY_FILE: sha256(library), TOKENIZER_FILE: sha256(out_dir / TOKENIZER_FILE)},
        "compile_seconds": round(time.time() - t0, 1),
    }
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {out_dir} ({library.stat().st_size / 1e6:.1f} MB .so) in {manifest['compile_seconds']} s",
          file=sys.stderr)
    return manifest


def lower_integer_graph(mod: tvm.IRModule, preset: TargetPreset, tiles: TileChooser | None) -> tvm.IRModule:
    """After Scale Propagation: int8 linear layers onto the preset's packed kernels (with ``tiles``), and
    matmul(x, permute_dims(W)) as one kernel reading W as stored (the tied int8 embedding/logits table is
    then kept once instead of also folded into a transposed copy)."""
    if tiles is not None:
        print(f"packing int8 weights for the tuned {preset.int8_dot} kernels", file=sys.stderr)
        mod = PackInt8Matmul(tiles, int8_dot(preset.int8_dot))(mod)
    return relax.transform.FuseTransposeMatmul()(mod)


def tile_chooser(preset: TargetPreset, database: Path | None) -> TileChooser | None:
    """Where the tuned kernels' tiles come from: ``database``, or the shipped one if it exists."""
    if preset.int8_dot is None:
        return None
    folder = database_or_shipped(preset.name, database)
    if folder is None:
        print(f"no tuning database shipped for {preset.name}: int8 kernels use default tiles", file=sys.stderr)
    return TileChooser(TuningDatabase(folder) if folder is not None else None, preset.int8_dot)


def _quantization_record(qcfg: QuantConfig | None, report: dict) -> dict:
    graph = report.get("after", report["before"])["total"]
    matmuls = graph.get("matmul_int", 0) + graph.get("matmul_float", 0)
    record = {"scheme": "fp32" if qcfg is None else qcfg.name, "matmuls_int": graph.get("matmul_int", 0),
              "matmuls": matmuls}
    if qcfg is not None:
        record.update(ranges=qcfg.ranges, keep_fp32=list(qcfg.keep_fp32), integer_softmax=qcfg.integer_softmax,
                      integer_layer_norm=qcfg.integer_layer_norm,
                      calibration=qcfg.calibration if qcfg.ranges == "calibrate" else None)
    return record
