"""int8mt inspect: what a bundle computes in integers, what stays in floats and why."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..schedules.tile_label import tile_label
from . import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="quantization report of a bundle: matmuls in INT8, Q/DQ ops, float ops")
    p.add_argument("bundle", type=Path, help="bundle directory from `int8mt compile`")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..runtime.bundle import REPORT_FILE, read_manifest

    manifest = read_manifest(args.bundle)
    report_file = args.bundle / REPORT_FILE
    if not report_file.is_file():
        raise UserError(f"{args.bundle} has no {REPORT_FILE}; it was built by an int8mt without reports, "
                        "compile it again")
    try:
        report = json.loads(report_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{report_file} is corrupt ({err}); compile the bundle again") from None
    if args.json:
        print(json.dumps({"manifest": manifest, "report": report}, indent=1))
        return 0
    print(format_report(manifest, report, args.bundle))
    return 0


def format_report(manifest: dict, report: dict, bundle: Path) -> str:
    q = manifest["quantization"]
    final = report.get("after", report["before"])  # an FP32 bundle has no pass, so no "after"
    before, after = report["before"]["total"], final["total"]
    lines = [f"bundle          {bundle}",
             f"target          {manifest['target']['preset']} {json.dumps(manifest['target']['tvm'])}"
             + (", decoder step as CUDA graphs" if manifest.get("cuda_graphs") else ""),
             f"quantization    {q['scheme']}" + (f", ranges {q['ranges']}" if q.get("ranges") else "")
             + (f" ({q['calibration']})" if q.get("calibration") else "")
             + (", integer softmax" if q.get("integer_softmax") else "")
             + (", integer layer norm" if q.get("integer_layer_norm") else ""),
             f"matmuls in INT  {q['matmuls_int']} of {q['matmuls']}"
             + (f"  (kept FP32: {', '.join(q['keep_fp32'])})" if q.get("keep_fp32") else ""),
             "",
             f"{'ops':<14}{'imported':>10}{'after scale propagation':>26}"]
    for key in ("quantize", "dequantize", "requantize", "matmul_int", "matmul_float", "softmax_int",
                "layer_norm_int"):
        lines.append(f"{key:<14}{before.get(key, 0):>10}{after.get(key, 0):>26}")
    lines += ["", "float ops left (after scale propagation):"]
    for op, info in final["float_ops"].items():
        lines.append(f"  {op.replace('relax.', ''):<18}{info['count']:>5}  {info['why']}")
    sizes = final["constant_bytes"]
    lines += ["", "weights (constants) by type: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sorted(sizes.items())),
              "per entry point: " + "; ".join(
                  f"{name} {f.get('matmul_int', 0)} int / {f.get('matmul_float', 0)} float matmuls"
                  for name, f in final["functions"].items())]
    for kind, kernels in (("int8", report.get("kernels")), ("float32", report.get("float_kernels"))):
        if not kernels:
            continue
        tuned = sum(k["tuned"] for k in kernels)
        lines += ["", f"{kind} linear kernels: {kernels[0].get('dot', 'vnni')} dot product, weights packed at "
                      f"compile time; {tuned} of {len(kernels)} tuned"]
        if not tuned:
            lines.append("  default tiles sized to the vector registers: no tuning record for these kernels (tune "
                         "them on the target's hardware, a board through an RPC tracker: int8mt tune --rpc)")
        for k in kernels:
            tiles = tile_label(**k["tiles"], block=k.get("block", (16, 4)))
            lines.append(f"  {k['function']:<12} {k['n']:>6} x {k['k']:<5} tiles {tiles:<28} "
                         f"{'tuned' if k['tuned'] else 'default tiles'} "
                         f"(for {k['rows_tuned_for']} rows)")
    attention = report.get("attention_kernels")
    if attention and not any(attention.values()):
        lines += ["", "attention matmuls (QK^T, softmax.V) in FP32"]
    elif attention:
        dot = f" ({report['attention_dot']} dot product)" if "attention_dot" in report else ""
        lines += ["", f"int8 attention matmuls (QK^T, softmax.V) on the batched kernel{dot}, operands packed at run "
                      "time: " + ", ".join(f"{name} {count}" for name, count in attention.items())]
    return "\n".join(lines)
