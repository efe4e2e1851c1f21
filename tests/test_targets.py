import pytest

from int8mt.schedules.intrin import DOTS
from int8mt.targets import PRESETS, get_preset, missing_features


def test_presets_are_cpu_targets_with_features():
    assert {"x86-vnni", "x86-avx512", "x86-avx2"} <= set(PRESETS)
    assert get_preset("x86-vnni").target == {"kind": "llvm", "mcpu": "znver4"}
    assert "avx512_vnni" in get_preset("x86-vnni").required_features
    assert [get_preset(name).int8_dot for name in ("x86-vnni", "x86-avx512", "x86-avx2")] == ["vnni", "avx512bw", "avx2"]
    assert all(p.int8_dot in DOTS for p in PRESETS.values() if p.int8_dot)


def test_unknown_preset_lists_known_names():
    with pytest.raises(ValueError, match="known presets: auto, x86-vnni, x86-avx512, x86-avx2"):
        get_preset("x86-sse2")


def test_missing_features():
    preset = get_preset("x86-vnni")
    assert missing_features(preset, {"avx512f", "avx512bw", "avx512vl"}) == ["avx512_vnni"]
    assert missing_features(preset, set(preset.required_features)) == []


def test_auto_picks_a_preset_this_cpu_runs():
    assert missing_features(get_preset("auto")) == []
