"""Target presets: each name maps to a TVM target dict and the CPU features its code needs; GPU presets also name
the compute capability their kernels need.

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
    int8_dot: str | None = None  # the int8 dot-product intrinsic family of the tuned CPU kernels, if any
    compute_capability: tuple[int, int] | None = None  # CUDA presets: the oldest GPU generation they run on

    @property
    def device(self) -> str:
        """Where the model runs: ``cpu`` or ``cuda``."""
        return target_device(self.target)


def target_device(target: dict) -> str:
    """Where code for the TVM target dict ``target`` runs: ``cuda`` for CUDA targets, else ``cpu``."""
    return "cuda" if target.get("kind") == "cuda" else "cpu"


# The instruction sets of the x86-64 micro-architecture levels, as Linux's /proc/cpuinfo names them. Each x86
# preset compiles for a level (LLVM's generic ``x86-64-vN`` CPU, plus ``mattr``) and requires exactly its flags.
X86_64_V2 = ("cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3")
X86_64_V3 = (*X86_64_V2, "abm", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "xsave")
X86_64_V4 = (*X86_64_V3, "avx512bw", "avx512cd", "avx512dq", "avx512f", "avx512vl")

# CUDA presets: (compute capability, the GPUs of that generation). Every preset's int8
# matmuls run on wmma m16n16k16 s8 tensor-core fragments (sm_72 and newer); CUDA 13 compiles for sm_75 and newer.
CUDA_ARCHITECTURES = (
    ((7, 5), "Turing: T4, RTX 20xx"),
    ((8, 0), "Ampere: A100, A30"),
    ((8, 6), "Ampere: A10, A40, RTX 30xx"),
    ((8, 9), "Ada: L4, L40S, RTX 40xx"),
    ((9, 0), "Hopper: H100, H200, GH200"),
)


def _cuda_preset(capability: tuple[int, int], gpus: str) -> TargetPreset:
    """A CUDA preset with the limits TVM's GPU schedules and MetaSchedule need spelled out; host code is generic
    x86-64, so a bundle runs on any x86-64 machine with such a GPU."""
    arch = f"sm_{capability[0]}{capability[1]}"
    return TargetPreset(
        name=f"cuda-{arch.replace('_', '')}",
        target={"kind": "cuda", "arch": arch, "max_threads_per_block": 1024, "max_num_threads": 1024,
                "max_shared_memory_per_block": 49152, "thread_warp_size": 32, "registers_per_block": 65536,
                "host": {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}},
        required_features=(),
        description=f"NVIDIA GPUs of compute capability {capability[0]}.{capability[1]} and newer ({gpus})",
        compute_capability=capability,
    )


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
        *(_cuda_preset(*spec) for spec in CUDA_ARCHITECTURES),
    )
}


AUTO = "auto"


def get_preset(name: str) -> TargetPreset:
    """The preset called ``name``; ``auto`` picks the first CPU preset this CPU can run."""
    if name == AUTO:
        for preset in PRESETS.values():
            if preset.device == "cpu" and not missing_features(preset):
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
    """CPU features ``preset`` needs that this CPU lacks (all of them on a non-x86 machine for x86 presets; for CUDA
    presets, whose host code is x86-64, a non-x86 machine lacks ``x86_64``)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return list(preset.required_features) or ["x86_64"]
    have = host_features() if features is None else features
    return [f for f in preset.required_features if f not in have]
