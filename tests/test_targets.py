import pytest
import tvm
from tvm.target.codegen import llvm_get_cpu_features

from int8mt.schedules.intrin import DOTS
from int8mt.targets import AUTO, PRESETS, get_preset, missing_features

# LLVM's names of the x86 instruction-set features a preset can require -> Linux's /proc/cpuinfo flags
LLVM_TO_CPUINFO = {
    "cx16": "cx16", "sahf": "lahf_lm", "popcnt": "popcnt", "sse3": "pni", "sse4.1": "sse4_1", "sse4.2": "sse4_2",
    "ssse3": "ssse3", "lzcnt": "abm", "avx": "avx", "avx2": "avx2", "bmi": "bmi1", "bmi2": "bmi2", "f16c": "f16c",
    "fma": "fma", "movbe": "movbe", "xsave": "xsave", "avx512f": "avx512f", "avx512bw": "avx512bw",
    "avx512cd": "avx512cd", "avx512dq": "avx512dq", "avx512vl": "avx512vl", "avx512vnni": "avx512_vnni",
    "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16", "avx512vbmi": "avx512vbmi", "gfni": "gfni",
    "vaes": "vaes", "vpclmulqdq": "vpclmulqdq", "amx-tile": "amx_tile", "amx-int8": "amx_int8",
    # aarch64: LLVM's names -> the kernel's HWCAP names (/proc/cpuinfo "Features")
    "fp-armv8": "fp", "neon": "asimd", "dotprod": "asimddp", "i8mm": "i8mm", "sve": "sve", "bf16": "bf16",
}


def test_presets_are_cpu_targets_with_features():
    assert {"x86-amx", "x86-vnni", "x86-avx512", "x86-avx2", "arm-i8mm", "arm-dotprod", "arm-neon"} <= set(PRESETS)
    assert get_preset("x86-vnni").target == {"kind": "llvm", "mcpu": "x86-64-v4", "mattr": ["+avx512vnni"]}
    assert "avx512_vnni" in get_preset("x86-vnni").required_features
    assert ([get_preset(name).int8_dot for name in ("x86-amx", "x86-vnni", "x86-avx512", "x86-avx2")]
            == ["amx", "vnni", "avx512bw", "avx2"])
    assert {"amx_tile", "amx_int8", "avx512_vnni"} <= set(get_preset("x86-amx").required_features)
    assert all(p.int8_dot in DOTS for p in PRESETS.values() if p.int8_dot)
    assert [get_preset(name).int8_dot for name in ("arm-i8mm", "arm-dotprod", "arm-neon")] == ["smmla", "sdot", "neon"]
    assert {p.arch for p in PRESETS.values()} == {"x86_64", "aarch64"}
    assert get_preset("arm-dotprod").arch == "aarch64" and get_preset("cuda-sm90").arch == "x86_64"


CPU_PRESETS = [name for name, preset in PRESETS.items() if preset.device == "cpu"]


@pytest.mark.parametrize("name", CPU_PRESETS)
def test_required_features_are_exactly_what_the_target_compiles_for(name):
    """The runtime checks ``required_features`` before it opens a bundle: they must be every instruction set
    LLVM may use for the preset's target, no more and no fewer."""
    preset = get_preset(name)
    enabled = set(llvm_get_cpu_features(tvm.target.Target(preset.target)))
    assert {flag for feature, flag in LLVM_TO_CPUINFO.items() if feature in enabled} == set(preset.required_features)


def test_unknown_preset_lists_known_names():
    with pytest.raises(ValueError,
                       match="known presets: auto, x86-amx, x86-vnni, x86-avx512, x86-avx2, arm-i8mm, arm-dotprod"):
        get_preset("x86-sse2")


def test_missing_features():
    preset = get_preset("x86-vnni")
    assert missing_features(preset, {"avx512f", "avx512bw", "avx512vl"})[-1] == "avx512_vnni"
    assert missing_features(preset, set(preset.required_features)) == []


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_auto_picks_the_first_preset_whose_features_the_cpu_has(monkeypatch, arch):
    from int8mt.targets import presets

    monkeypatch.setattr(presets, "host_arch", lambda: arch)
    monkeypatch.setattr(presets, "amx_permission", lambda: None)
    names = [name for name in CPU_PRESETS if PRESETS[name].arch == arch]
    assert names
    for name in names:
        monkeypatch.setattr(presets, "host_features", lambda p=PRESETS[name]: set(p.required_features))
        assert get_preset(AUTO).name == name  # the presets are listed from most to least capable
    monkeypatch.setattr(presets, "host_features", lambda: {"sse2"})
    with pytest.raises(ValueError, match="no target preset fits this CPU"):
        get_preset(AUTO)


def test_auto_passes_over_amx_where_linux_refuses_the_tiles(monkeypatch):
    from int8mt.targets import presets

    monkeypatch.setattr(presets, "host_arch", lambda: "x86_64")
    monkeypatch.setattr(presets, "host_features", lambda: set(PRESETS["x86-amx"].required_features))
    monkeypatch.setattr(presets, "amx_permission", lambda: "Linux refused the AMX tile state")
    assert get_preset(AUTO).name == "x86-vnni"


def test_a_preset_of_another_architecture_lacks_the_architecture(monkeypatch):
    from int8mt.targets import presets

    monkeypatch.setattr(presets, "host_arch", lambda: "x86_64")
    assert missing_features(get_preset("arm-neon")) == ["aarch64", "fp", "asimd"]
    monkeypatch.setattr(presets, "host_arch", lambda: "aarch64")
    monkeypatch.setattr(presets, "host_features", lambda: {"fp", "asimd", "asimddp"})
    assert missing_features(get_preset("arm-dotprod")) == [] and missing_features(get_preset("arm-i8mm")) == ["i8mm"]
    assert missing_features(get_preset("x86-avx2"))[0] == "x86_64"


def test_aarch64_features_come_from_the_kernels_hwcap_bits(monkeypatch):
    """Under emulation /proc/cpuinfo shows the host's CPU; ``getauxval`` reports the emulated one, as real aarch64
    Linux does: HWCAP bit 1 asimd, bit 20 asimddp; HWCAP2 bit 13 i8mm."""
    from int8mt.targets import presets

    class Libc:
        @staticmethod
        def getauxval(kind):
            return {16: 1 << 0 | 1 << 1 | 1 << 20, 26: 1 << 13}[kind]

    monkeypatch.setattr(presets.ctypes, "CDLL", lambda _name: Libc)
    monkeypatch.setattr(presets, "host_arch", lambda: "aarch64")
    assert presets.host_features() == {"fp", "asimd", "asimddp", "i8mm"}
