"""``int8mt verify``: the compiled integer graph of a quantized model against the NumPy integer reference,
on real sentences, summarised per matmul site (layers pooled)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from int8mt.compiler.integer_check import MatmulCheck
from int8mt.errors import UserError
from int8mt.quant.config import QuantConfig


@dataclass(frozen=True)
class VerifyRequest:
    model_dir: Path
    target: str  # a preset this CPU runs
    quant: QuantConfig
    data_dir: Path  # test_2016_flickr sentences come from here (and calibration's, for calibrated ranges)
    sentences: int = 8
    steps: int = 4
    database: Path | None = None
    calib_sentences: int = 512
    src_lang: str = "en"
    tgt_lang: str = "de"


@dataclass(frozen=True)
class VerifyResult:
    checks: list[MatmulCheck]
    rows: list["VerifyRow"]
    meta: dict
    mismatch: str | None = None  # the graphs do not line up (a bug to report)


def verify(request: VerifyRequest) -> VerifyResult:
    """Compile the quantized model with every integer matmul tapped and compare each with the NumPy integer
    reference on one batch of test sentences (encode, then ``steps`` decoder steps)."""
    from int8mt.compiler.integer_check import GraphMismatch, check_integer_graph, compile_tapped
    from int8mt.compiler.pipeline import tile_choosers
    from int8mt.data import read_parallel
    from int8mt.model.checkpoint import check_model_dir
    from int8mt.quant.checkpoint import quantized_model
    from int8mt.targets import amx_permission, get_preset, missing_features, needs_amx
    from int8mt.tokenizer import load_tokenizer

    preset = get_preset(request.target)
    if preset.device == "cuda":
        raise UserError(f"verify runs the compiled model on this CPU beside the NumPy integer reference; {preset.name} "
                         "is a GPU preset: verify a CPU preset, and check CUDA kernels on a GPU with "
                         "scripts/cuda_gpu_check.py (docs/cuda.md)")
    if missing_features(preset):
        raise UserError(f"this CPU cannot run {preset.name} code (it lacks {', '.join(missing_features(preset))}); "
                         "verify runs what it compiles: pick a preset with `int8mt targets`")
    if needs_amx(preset) and amx_permission() is not None:
        raise UserError(f"{preset.name} code uses AMX tiles, but {amx_permission()}; verify x86-vnni instead")
    if request.sentences < 1 or request.steps < 1:
        raise UserError("--sentences and --steps must be at least 1")
    check_model_dir(request.model_dir)
    qcfg = request.quant
    model = quantized_model(request.model_dir, qcfg, request.data_dir, calib_sentences=request.calib_sentences)
    sources, targets = read_parallel(request.data_dir, "test_2016_flickr", request.src_lang, request.tgt_lang)
    c = model.cfg
    src, tokens = inputs(sources[:request.sentences], targets[:request.sentences],
                         load_tokenizer(request.model_dir), c.decoder_start_id, c.pad_id,
                         request.steps)
    vm = compile_tapped(model, preset, *tile_choosers(preset, request.database), qcfg)
    meta = {"model": str(request.model_dir), "target": preset.name, "scheme": qcfg.name, "ranges": qcfg.ranges,
            "fp32": list(qcfg.fp32_patterns), "integer_softmax": qcfg.integer_softmax, "integer_layer_norm": qcfg.integer_layer_norm,
            "sentences": len(src), "steps": request.steps}
    try:
        checks = check_integer_graph(model, vm, src, tokens, qcfg)
    except GraphMismatch as err:
        return VerifyResult([], [], meta, str(err))
    return VerifyResult(checks, summarize(checks), meta)


@dataclass(frozen=True)
class VerifyRow:
    function: str
    site: str             # module name with layer indices replaced by *
    calls: int            # matmuls checked (layers x calls)
    exact: int            # of those, int32 results exactly the product of their operands
    operands_equal: float  # % of operand elements equal to the reference's
    operands_max_diff: int
    result_equal: float   # % of result elements equal to the reference's


def inputs(sources: list[str], targets: list[str], tokenizer, start_id: int, pad_id: int, steps: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """Source ids [B, S] and decoder inputs [B, steps] (start token, then the reference translation)."""
    from int8mt.data import pad_batch

    src = pad_batch(tokenizer.encode_batch(sources), pad_id)
    tgt = [[start_id] + ids for ids in tokenizer.encode_batch(targets)]
    if min(len(t) for t in tgt) < steps:
        raise UserError(f"--steps {steps} is longer than the shortest reference translation "
                         f"({min(len(t) for t in tgt)} tokens); use fewer steps or other sentences")
    return src, np.array([t[:steps] for t in tgt], dtype=np.int64)


def summarize(checks: list[MatmulCheck]) -> list[VerifyRow]:
    groups: dict[tuple[str, str], list[MatmulCheck]] = {}
    for c in checks:
        groups.setdefault((c.function, re.sub(r"\.\d+\.", ".*.", c.name)), []).append(c)
    return [VerifyRow(function, site, len(cs), sum(c.exact for c in cs),
                      round(100 * float(np.mean([c.operands_equal for c in cs])), 3),
                      max(c.operands_max_diff for c in cs), round(100 * float(np.mean([c.result_equal for c in cs])), 3))
            for (function, site), cs in groups.items()]


def format_rows(rows: list[VerifyRow]) -> str:
    lines = ["| function | matmul | checked | int32 exact | operands = reference % | max step | results = reference % |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.function} | {r.site} | {r.calls} | {r.exact}/{r.calls} | {r.operands_equal} | "
              f"{r.operands_max_diff} | {r.result_equal} |" for r in rows]
    exact, total = sum(r.exact for r in rows), sum(r.calls for r in rows)
    lines.append(f"\n{exact} of {total} matmul results are exactly the integer product of their operands")
    return "\n".join(lines)


def write_rows(rows: list[VerifyRow], checks: list[MatmulCheck], meta: dict, json_path: Path | None) -> str:
    table = format_rows(rows)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({**meta, "sites": [r.__dict__ for r in rows],
                                         "matmuls": [c.to_dict() for c in checks]}, indent=1) + "\n")
        json_path.with_suffix(".txt").write_text(table + "\n")
    return table
