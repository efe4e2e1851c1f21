"""Target presets: each name maps to a TVM target dict and the CPU features its code needs.

Kept free of TVM imports so that the runtime can check a bundle's features before loading its ``.so``.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TargetPreset:
    name: str
    target: dict
    required_features: tuple[str, ...]
    description: str
    int8_dot: str | None = None  # the int8 dot-product intrinsic family of the tuned kernels, if any


PRESETS: dict[str, TargetPreset] = {
    p.name: p
    for p in (
        TargetPreset(
            name="x86-vnni",
            target={"kind": "llvm", "mcpu": "znver4"},
            required_features=("avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
            description="x86-64 with AVX-512 VNNI (AMD Zen 4, Intel Ice Lake and newer)",
            int8_dot="vnni",
        ),
        TargetPreset(
            name="x86-avx512",
            target={"kind": "llvm", "mcpu": "skylake-avx512"},
            required_features=("avx512f", "avx512bw", "avx512vl"),
            description="x86-64 with AVX-512 BW but no VNNI (Intel Skylake-SP, Cascade Lake without VNNI)",
            int8_dot="avx512bw",
        ),
        TargetPreset(
            name="x86-avx2",
            target={"kind": "llvm", "mcpu": "haswell"},
            required_features=("avx2", "fma"),
            description="generic x86-64 with AVX2 and FMA (Haswell and newer)",
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
        raise ValueError(f"no target preset fits this CPU; known presets: {', '.join(PRESETS)}")
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown target preset {name!r}; known presets: {AUTO}, {', '.join(PRESETS)}") from None


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
