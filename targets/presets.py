"""Target presets: each name maps to a TVM target dict and the CPU features its code needs.

Kept free of TVM imports so that the runtime can check a bundle's features before loading its ``.so``.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

from int8mt.errors import UserError


@dataclass(frozen=True)
class TargetPreset:
    name: str
    target: dict
    required_features: tuple[str, ...]
    description: str
    int8_dot: str | None = None  # the int8 dot-product intrinsic family of the tuned kernels, if any


# The instruction sets of the x86-64 micro-architecture levels, as Linux's /proc/cpuinfo names them. Each x86
# preset compiles for a level (LLVM's generic ``x86-64-vN`` CPU, plus ``mattr``) and requires exactly its flags.
X86_64_V2 = ("cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3")
X86_64_V3 = (*X86_64_V2, "abm", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "xsave")
X86_64_V4 = (*X86_64_V3, "avx512bw", "avx512cd", "avx512dq", "avx512f", "avx512vl")

PRESETS: dict[str, TargetPreset] = {
    p.name: p
    for p in (
        TargetPreset(
            name="x86-vnni",
            target={"kind": "llvm", "mcpu": "x86-64-v4", "mattr": ["+avx512vnni"]},
            required_features=(*X86_64_V4, "avx512_vnni"),
            description="x86-64-v4 with AVX-512 VNNI (Intel Ice Lake / Sapphire Rapids and newer, AMD Zen 4 and newer)",
            int8_dot="vnni",
        ),
        TargetPreset(
            name="x86-avx512",
            target={"kind": "llvm", "mcpu": "x86-64-v4"},
            required_features=X86_64_V4,
            description="x86-64-v4: AVX-512 F/BW/CD/DQ/VL without VNNI (Intel Skylake-SP, Cascade Lake)",
            int8_dot="avx512bw",
        ),
        TargetPreset(
            name="x86-avx2",
            target={"kind": "llvm", "mcpu": "x86-64-v3"},
            required_features=X86_64_V3,
            description="x86-64-v3: AVX2, FMA, BMI1/2 (Intel Haswell, AMD Zen 1 and newer)",
            int8_dot="avx2",
        ),
    )
}


AUTO = "auto"


def get_preset(name: str) -> TargetPreset:
    """The preset called ``name``; ``auto`` picks the first preset this CPU can run."""
    if name == AUTO:
        for preset in PRESETS.values():
            if not missing_features(preset):
                return preset
        raise UserError(f"no target preset fits this CPU; known presets: {', '.join(PRESETS)}")
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown target preset {name!r}; known presets: {AUTO}, {', '.join(PRESETS)}") from None


def host_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """CPU feature flags of this machine (Linux ``/proc/cpuinfo``; empty set where unavailable)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def missing_features(preset: TargetPreset, features: set[str] | None = None) -> list[str]:
    """Features ``preset`` needs that this CPU lacks (all of them on a non-x86 machine for x86 presets)."""
    if preset.target["kind"] == "llvm" and platform.machine() not in ("x86_64", "AMD64"):
        return list(preset.required_features)
    have = host_features() if features is None else features
    return [f for f in preset.required_features if f not in have]
