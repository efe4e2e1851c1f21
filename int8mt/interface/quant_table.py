"""The quantization table: FP32 against INT8/INT6 with each range method, as compiled bundles on one test
set: BLEU (beam search), its share of the FP32 BLEU, matmuls in integers and bundle size."""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from int8mt.quant.config import RANGE_METHODS, QuantConfig


@dataclass
class QuantRow:
    scheme: str
    ranges: str
    bleu: float
    bleu_vs_fp32: float
    matmuls_int: str
    so_mb: float
    size_vs_fp32: float
    sentences_per_second: float


def quant_table(model_dir: Path, data_dir: Path, target: str, build_dir: Path, sources: list[str],
                references: list[str], bits: tuple[int, ...] = (8, 6), beam_size: int = 4) -> list[QuantRow]:
    from int8mt.compiler.build import build_bundle
    from int8mt.targets import get_preset
    from int8mt.runtime.options import SearchOptions
    from int8mt.runtime.translator import Translator

    from .evaluate import evaluate

    configs = [None] + [QuantConfig(bits=b, ranges=r) for b in bits for r in RANGE_METHODS]
    rows: list[QuantRow] = []
    for qcfg in configs:
        name = "fp32" if qcfg is None else f"{qcfg.name}-{qcfg.ranges}"
        print(f"== {name}", file=sys.stderr)
        out = build_dir / name
        manifest = build_bundle(model_dir, get_preset(target), out, qcfg=qcfg, data_dir=data_dir)
        result, _ = evaluate(Translator(out, SearchOptions(beam_size=beam_size)), sources, references)
        so_mb = (out / "model.so").stat().st_size / 1e6
        base = rows[0] if rows else None
        q = manifest["quantization"]
        rows.append(QuantRow("fp32" if qcfg is None else qcfg.name, "-" if qcfg is None else qcfg.ranges,
                             result.bleu, round(100 * result.bleu / base.bleu, 2) if base else 100.0,
                             f"{q['matmuls_int']}/{q['matmuls']}", round(so_mb, 1),
                             round(so_mb / base.so_mb, 3) if base else 1.0, result.sentences_per_second))
    return rows


def format_quant_table(rows: list[QuantRow]) -> str:
    lines = ["| scheme | ranges | BLEU | % of FP32 | matmuls in integers | .so MB | size vs FP32 | sentences/s |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.scheme} | {r.ranges} | {r.bleu} | {r.bleu_vs_fp32} | {r.matmuls_int} | {r.so_mb} | "
              f"{r.size_vs_fp32} | {r.sentences_per_second} |" for r in rows]
    return "\n".join(lines)


def write_quant_table(rows: list[QuantRow], json_path: Path | None) -> str:
    table = format_quant_table(rows)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
        json_path.with_suffix(".txt").write_text(table + "\n")
    return table
