"""int8mt targets: list the target presets and whether this CPU can run them."""
from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("targets", help="list target presets")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..targets import PRESETS, missing_features

    name_width = max(len(p.name) for p in PRESETS.values())
    target_width = max(len(json.dumps(p.target)) for p in PRESETS.values())
    for preset in PRESETS.values():
        missing = missing_features(preset)
        status = "runs here" if not missing else f"not on this CPU (lacks {', '.join(missing)})"
        dot = f"int8 dot product {preset.int8_dot}" if preset.int8_dot else "no int8 kernels"
        print(f"{preset.name:<{name_width}} {json.dumps(preset.target):<{target_width}} {preset.description}; "
              f"{dot}; {status}")
    return 0
