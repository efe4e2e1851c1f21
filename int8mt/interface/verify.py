"""``int8mt verify``: the compiled integer graph of a quantized model against the NumPy integer reference,
on real sentences, summarised per matmul site (layers pooled)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from int8mt.compiler.integer_check import MatmulCheck


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
        raise ValueError(f"--steps {steps} is longer than the shortest reference translation "
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
