"""Target presets: each name maps to a TVM target dict and the CPU features its code needs; GPU presets also name
the compute capability their kernels need. CPU presets are for x86-64 or aarch64 (``arch``); a preset of another
architecture than this machine's cross-compiles.

Kept free of TVM imports so that the runtime can check a bundle's features before loading its ``.so``.
"""
from __future__ import annotations

import ctypes
import functools
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
    float_dot: str | None = None  # the float32 multiply-add family of the dense kernel of FP32 layers, if any
    compute_capability: tuple[int, int] | None = None  # CUDA presets: the oldest GPU generation they run on
    tiles_from: str | None = None  # the preset whose tuned tiles its dense kernels use, if not its own

    @property
    def device(self) -> str:
        """Where the model runs: ``cpu`` or ``cuda``."""
        return target_device(self.target)

    @property
    def tuned_preset(self) -> "TargetPreset":
        """The preset whose tuning database (and tiles) this one's kernels use: ``tiles_from``, else itself."""
        return PRESETS[self.tiles_from] if self.tiles_from else self

    @property
    def arch(self) -> str:
        """The CPU architecture of the preset's (host) code: ``x86_64`` or ``aarch64``."""
        return target_arch(self.target)


def target_device(target: dict) -> str:
    """Where code for the TVM target dict ``target`` runs: ``cuda`` for CUDA targets, else ``cpu``."""
    return "cuda" if target.get("kind") == "cuda" else "cpu"


def target_arch(target: dict) -> str:
    """The CPU architecture the TVM target dict ``target`` (or, for a GPU target, its host) compiles for."""
    triple = target.get("host", target).get("mtriple", "x86_64-linux-gnu")
    return "aarch64" if triple.startswith(("aarch64", "arm64")) else "x86_64"


def host_arch() -> str:
    """This machine's CPU architecture in :func:`target_arch`'s terms (``platform.machine()`` otherwise)."""
    machine = platform.machine()
    return {"AMD64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


# The instruction sets of the x86-64 micro-architecture levels, as Linux's /proc/cpuinfo names them. Each x86
# preset compiles for a level (LLVM's generic ``x86-64-vN`` CPU, plus ``mattr``) and requires exactly its flags.
X86_64_V2 = ("cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3")
X86_64_V3 = (*X86_64_V2, "abm", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "xsave")
X86_64_V4 = (*X86_64_V3, "avx512bw", "avx512cd", "avx512dq", "avx512f", "avx512vl")

AMX_FEATURES = ("amx_tile", "amx_int8")  # the tile unit and its int8 multiply (``tdpbusd``)

# aarch64: the kernel's names of the features (Linux ``HWCAP``/``HWCAP2`` bits, as /proc/cpuinfo's "Features" lists
# them) that every aarch64 preset's code uses: floating point and Advanced SIMD (NEON).
AARCH64_NEON = ("fp", "asimd")
AARCH64_HWCAPS = {"fp": (16, 0), "asimd": (16, 1), "asimddp": (16, 20), "i8mm": (26, 13)}  # name: (AT_HWCAP*, bit)

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
            name="x86-amx",
            target={"kind": "llvm", "mcpu": "x86-64-v4", "mattr": ["+avx512vnni", "+amx-tile", "+amx-int8"]},
            required_features=(*X86_64_V4, "avx512_vnni", *AMX_FEATURES),
            description="x86-64-v4 with AVX-512 VNNI and AMX int8 tiles (Intel Sapphire Rapids, Emerald Rapids, "
                        "Granite Rapids and newer)",
            int8_dot="amx",
            float_dot="fp32-avx512",
            tiles_from="x86-vnni",  # fewer than 8 rows run x86-vnni's tuned kernel; AMX blocks: their own table
        ),
        TargetPreset(
            name="x86-vnni",
            target={"kind": "llvm", "mcpu": "x86-64-v4", "mattr": ["+avx512vnni"]},
            required_features=(*X86_64_V4, "avx512_vnni"),
            description="x86-64-v4 with AVX-512 VNNI (Intel Cascade Lake, Ice Lake and newer, AMD Zen 4 and newer)",
            int8_dot="vnni",
            float_dot="fp32-avx512",
        ),
        TargetPreset(
            name="x86-avx512",
            target={"kind": "llvm", "mcpu": "x86-64-v4"},
            required_features=X86_64_V4,
            description="x86-64-v4: AVX-512 F/BW/CD/DQ/VL without VNNI (Intel Skylake-SP and Skylake-X)",
            int8_dot="avx512bw",
            float_dot="fp32-avx512",
        ),
        TargetPreset(
            name="x86-avx2",
            target={"kind": "llvm", "mcpu": "x86-64-v3"},
            required_features=X86_64_V3,
            description="x86-64-v3: AVX2, FMA, BMI1/2 (Intel Haswell, AMD Zen 1 and newer)",
            int8_dot="avx2",
            float_dot="fp32-avx2",
        ),
        TargetPreset(
            name="arm-i8mm",
            target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod", "+i8mm"]},
            required_features=(*AARCH64_NEON, "asimddp", "i8mm"),
            description="aarch64 with the int8 matrix multiply (smmla): Neoverse V1/V2/N2 (AWS Graviton 3/4), "
                        "Cortex-A510/A710/X2 and newer",
            int8_dot="smmla",
            float_dot="fp32-neon",
        ),
        TargetPreset(
            name="arm-dotprod",
            target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]},
            required_features=(*AARCH64_NEON, "asimddp"),
            description="aarch64 with the int8 dot product (sdot): Cortex-A76 (Raspberry Pi 5), Neoverse N1 "
                        "(AWS Graviton 2, Ampere Altra), Cortex-A78AE (Jetson Orin)",
            int8_dot="sdot",
            float_dot="fp32-neon",
        ),
        TargetPreset(
            name="arm-neon",
            target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]},
            required_features=AARCH64_NEON,
            description="aarch64 with NEON only (widening multiplies smull/sadalp): Cortex-A72 (Raspberry Pi 4), "
                        "Cortex-A53/A55, Cortex-A57 (Jetson Nano)",
            int8_dot="neon",
            float_dot="fp32-neon",
        ),
        *(_cuda_preset(*spec) for spec in CUDA_ARCHITECTURES),
    )
}


AUTO = "auto"


def get_preset(name: str) -> TargetPreset:
    """The preset called ``name``; ``auto`` picks the first CPU preset this CPU (and, for AMX, its operating
    system) can run."""
    if name == AUTO:
        for preset in PRESETS.values():
            if preset.device == "cpu" and not missing_features(preset) and (not needs_amx(preset)
                                                                           or amx_permission() is None):
                return preset
        raise UserError(f"no target preset fits this CPU; known presets: {', '.join(PRESETS)}")
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown target preset {name!r}; known presets: {AUTO}, {', '.join(PRESETS)}") from None


def host_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """CPU feature flags of this machine: on x86-64 Linux's ``/proc/cpuinfo`` flags; on aarch64 the kernel's
    ``HWCAP`` bits (:data:`AARCH64_HWCAPS`), which emulators report for the emulated CPU while ``/proc/cpuinfo``
    shows the host's; an empty set where unavailable."""
    if host_arch() == "aarch64":
        return aarch64_hwcaps()
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def host_cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """This machine's CPU model as Linux names it (e.g. ``Intel(R) Xeon(R) Processor``), else the architecture."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def aarch64_hwcaps() -> set[str]:
    """The :data:`AARCH64_HWCAPS` features ``getauxval`` reports on this (aarch64 Linux) machine."""
    try:
        getauxval = ctypes.CDLL(None).getauxval
    except (OSError, AttributeError):
        return set()
    getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
    return {name for name, (auxv, bit) in AARCH64_HWCAPS.items() if getauxval(auxv) >> bit & 1}


def missing_features(preset: TargetPreset, features: set[str] | None = None) -> list[str]:
    """CPU features ``preset`` needs that this CPU lacks: on a machine of another architecture than the preset's,
    the architecture itself (e.g. ``aarch64``) and all of them (for CUDA presets, the host code's architecture)."""
    if host_arch() != preset.arch and features is None:
        return [preset.arch, *preset.required_features]
    have = host_features() if features is None else features
    return [f for f in preset.required_features if f not in have]


def needs_amx(preset: TargetPreset) -> bool:
    """Whether ``preset``'s code uses AMX tiles (so a process must be granted them before running it)."""
    return set(AMX_FEATURES) <= set(preset.required_features)


_ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA, _SYS_ARCH_PRCTL = 0x1023, 18, 158  # Linux x86-64


@functools.cache  # one request per process
def amx_permission() -> str | None:
    """Ask Linux once per process for the AMX tile data state (``arch_prctl(ARCH_REQ_XCOMP_PERM,
    XFEATURE_XTILEDATA)``; without it the first tile instruction kills the process with SIGILL). None when granted,
    else why not (Linux before 5.16, a kernel or hypervisor that does not offer it, another OS)."""
    if host_arch() != "x86_64" or platform.system() != "Linux":
        return f"AMX tiles are granted by Linux on x86-64; this is {platform.system()} on {host_arch()}"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) != 0:
        errno = ctypes.get_errno()
        return f"Linux refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM: errno {errno}; it needs 5.16+)"
    return None
