"""Shared fixtures: a tiny random model with the shipped tokenizer, its compiled bundle, and a copy of that
bundle to damage."""
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import tvm  # noqa: F401  (the whole TVM, first: tests compile and run bundles in one process, and the CLI's
            # commands that only run bundles would otherwise import TVM's runtime library alone)

from int8mt.model.checkpoint import save_model_dir
from int8mt.model.config import ModelConfig
from int8mt.model.transformer import Transformer
from int8mt.targets import PRESETS, TargetPreset, amx_permission, get_preset, missing_features, needs_amx

HOST_PRESET = get_preset("auto")  # the best preset this CPU runs: tests execute what they compile
VNNI = get_preset("x86-vnni")
needs_vnni = pytest.mark.skipif(bool(missing_features(VNNI)), reason="this CPU has no AVX-512 VNNI to run the kernels")


def runnable(preset: TargetPreset) -> pytest.param:
    """``preset`` as a test parameter, skipped where this CPU (or, for AMX, its operating system) cannot run its
    code; AMX presets get the process its tile permission."""
    missing = missing_features(preset)
    reason = f"this CPU lacks {', '.join(missing)}" if missing else None
    if reason is None and needs_amx(preset):
        reason = amx_permission()
    return pytest.param(preset, id=preset.name, marks=pytest.mark.skipif(reason is not None, reason=reason or ""))


INT8_PRESETS = [runnable(p) for p in PRESETS.values() if p.int8_dot]  # every preset with int8 kernels
# the x86 float32 multiply-add families (NEON: tests/arm)
FLOAT_PRESETS = [runnable(PRESETS[name]) for name in ("x86-avx512", "x86-avx2")]
ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "model" / "ende"
DATA_DIR = ROOT.parent / "shared" / "data" / "multi30k"
TINY = ModelConfig(vocab_size=8000, d_model=32, encoder_layers=2, decoder_layers=2, heads=4, ffn_dim=64,
                   max_positions=64, dropout=0.0)


@pytest.fixture(scope="session")
def tiny_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(TINY).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-model")
    save_model_dir(tiny_model, out, MODEL_DIR / "spm.model")
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tiny_model_dir, tmp_path_factory) -> Path:
    from int8mt.compiler.build import build_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny-x86"
    build_bundle(tiny_model_dir, HOST_PRESET, out)
    return out


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    return out


def edit_manifest(bundle: Path, change: Callable[[dict], object]) -> None:
    """Rewrite ``bundle``'s manifest with ``change`` applied to it (in place)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    change(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def as_cuda_sm90(manifest: dict) -> None:
    """A CPU bundle's ``manifest`` edited into a cuda-sm90 bundle's: loading it then needs a GPU of compute
    capability 9.0, which refuses it without one (its library is a CPU one: not for a machine with a GPU)."""
    manifest["target"].update(preset="cuda-sm90", tvm={"kind": "cuda", "arch": "sm_90"})
    manifest["cuda"] = {"arch": "sm_90", "compute_capability": [9, 0], "source_sha256": "0" * 64}


def through_the_gpu_host_path(bundle):
    """``bundle`` (a loaded CPU :class:`~int8mt.runtime.bundle.Bundle`) driven as a GPU bundle is: inputs copied
    into TVM's memory and packed into the staging buffer, results copied back, no greedy loop, its pools the GPU's.
    Its device is still the CPU, so what runs is the runtime's GPU code on memory this machine has."""
    from int8mt.runtime import bundle as bundle_mod

    bundle._on_gpu, bundle._tvm, bundle._pooled, bundle._greedy = (
        True, bundle_mod.import_tvm_runtime(), bundle_mod._POOLED["gpu"], None)
    return bundle
