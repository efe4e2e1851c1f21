"""int8mt targets: list the target presets and whether this CPU can run them."""
from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("targets", help="list target presets")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..targets import PRESETS, missing_features

    for preset in PRESETS.values():
        missing = missing_features(preset)
        status = "runs here" if not missing else f"not on this CPU (lacks {', '.join(missing)})"
        print(f"{preset.name:<10} {json.dumps(preset.target):<36} {preset.description}; {status}")
    return 0
