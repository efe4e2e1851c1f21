"""int8mt targets: list the target presets and whether this machine (its CPU, its GPU) can run them."""
from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("targets", help="list target presets")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import UserError
    from ..targets import AUTO, PRESETS, amx_permission, get_preset, host_arch, missing_features, needs_amx

    name_width = max(len(p.name) for p in PRESETS.values())
    indent = " " * (name_width + 2)
    gpu = _visible_gpu() if any(p.device == "cuda" for p in PRESETS.values()) else None
    for preset in PRESETS.values():
        missing = missing_features(preset)
        status = "runs here" if not missing else f"not on this CPU (lacks {', '.join(missing)})"
        if not missing and needs_amx(preset) and amx_permission() is not None:
            status = f"not here: {amx_permission()}"
        if preset.arch != host_arch():
            status = (f"{preset.arch} code: cross-compiles here, runs on {preset.arch} CPUs with "
                      f"{', '.join(preset.required_features)}")
        if preset.device == "cuda" and not missing:
            status = ("no CUDA GPU here (compiles here all the same)" if gpu is None else
                      f"runs on this GPU ({gpu[0]})" if gpu[1] >= preset.compute_capability else
                      f"not on this GPU ({gpu[0]}, compute capability {gpu[1][0]}.{gpu[1][1]})")
        dot = (f"int8 dot product {preset.int8_dot}" if preset.int8_dot else
               "int8 tensor cores (wmma s8)" if preset.device == "cuda" else "no int8 kernels")
        print(f"{preset.name:<{name_width}}  {status}\n{indent}{preset.description}; {dot}\n"
              f"{indent}TVM target {json.dumps(preset.target)}")
    try:
        print(f"\n{AUTO} (compile.target's default) picks {get_preset(AUTO).name} here")
    except UserError as err:
        print(f"\n{AUTO}: {err}")
    return 0


def _visible_gpu() -> tuple[str, tuple[int, int]] | None:
    """This machine's first CUDA GPU: its name and compute capability."""
    from ..runtime.bundle import import_tvm_runtime
    from ..runtime.cuda import visible_gpu

    gpu = visible_gpu(import_tvm_runtime())
    return None if gpu is None else (gpu[0].device_name, gpu[1])
