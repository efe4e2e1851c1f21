"""The reference model compiled on this x86-64 machine for the ARM presets and run, as a board would run it
(int8mt installed with pip, TVM's runtime only), on an emulated aarch64 CPU of the preset: with integer softmax
and layer norm it translates test sentences bit-identically to the x86 bundle, all 67 matmuls in integers on
the preset's instruction; with the default float softmax and layer norm (``-m extended``) at least 98 of 100
sentences are identical; a CPU without the preset's instruction is refused before the library is opened."""
import json
import subprocess
import sys

import pytest

from int8mt.quant.config import QuantConfig
from int8mt.schedules.intrin import batch_dot, int8_dot
from int8mt.targets import get_preset

from ..conftest import DATA_DIR, HOST_PRESET, MODEL_DIR
from .emulation import CPUS, count_instructions, install_int8mt, needs_emulation, run_aarch64
from .test_kernels import INSTRUCTIONS

pytestmark = needs_emulation
SENTENCES = 16
INTEGER_ONLY = QuantConfig(ranges="learned", integer_softmax=True, integer_layer_norm=True)
DEFAULT = QuantConfig(ranges="learned")
RUNTIME = QuantConfig(ranges="runtime")
# (preset, a qemu CPU without its instruction). The default run takes arm-i8mm, whose model has every kind of
# ARM kernel (smmla linear layers with their epilogues, sdot attention); every preset's kernels are tested in
# test_kernels.py.
PRESETS_RUN = [pytest.param("arm-i8mm", "neoverse-n1", id="arm-i8mm"),
               pytest.param("arm-dotprod", "cortex-a53", id="arm-dotprod", marks=pytest.mark.extended),
               pytest.param("arm-neon", None, id="arm-neon", marks=pytest.mark.extended)]


def _compile(preset: str, qcfg: QuantConfig, out):
    from int8mt.compiler.build import build_bundle

    build_bundle(MODEL_DIR, get_preset(preset), out, qcfg=qcfg, data_dir=DATA_DIR)
    return out


def _start_compiling(preset: str, qcfg: QuantConfig, out) -> subprocess.Popen:
    """``int8mt compile`` of the reference model in another process (two builds at once on two cores)."""
    flags = [*(["--integer-softmax"] if qcfg.integer_softmax else []),
             *(["--integer-layer-norm"] if qcfg.integer_layer_norm else [])]
    return subprocess.Popen([sys.executable, "-m", "int8mt", "compile", str(MODEL_DIR), "--target", preset, "--quant",
                             qcfg.name, "--ranges", qcfg.ranges, *flags, "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _compile_with_x86(preset: str, qcfg: QuantConfig, out, x86_translations, source):
    """The ARM bundle, compiled while the x86 one (if not made yet) compiles and translates ``source`` here."""
    build = _start_compiling(preset, qcfg, out)
    x86 = x86_translations(qcfg, source)
    _, err = build.communicate()
    assert build.returncode == 0, err[-3000:]
    return out, x86


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    """int8mt as ``pip install`` puts it on a board."""
    return install_int8mt(tmp_path_factory.mktemp("aarch64-site"))


def _source(tmp_path_factory, sentences: int):
    path = tmp_path_factory.mktemp("source") / "test.en"
    lines = (DATA_DIR / "test_2016_flickr.en").read_text().splitlines()[:sentences]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return _source(tmp_path_factory, SENTENCES)


@pytest.fixture(scope="module")
def x86_translations(tmp_path_factory):
    """The x86 bundle's translations of a source file, per variant (integer-only, default)."""
    bundles, cache = {}, {}

    def translations(qcfg: QuantConfig, source) -> list[str]:
        if qcfg not in bundles:
            bundles[qcfg] = _compile(HOST_PRESET.name, qcfg, tmp_path_factory.mktemp("x86") / "bundle")
        if (qcfg, source) not in cache:
            cache[qcfg, source] = _translate_here(bundles[qcfg], source)
        return cache[qcfg, source]

    return translations


def _translate_here(bundle, source) -> list[str]:
    done = subprocess.run([sys.executable, "-m", "int8mt", "translate", str(bundle), "-i", str(source)],
                          capture_output=True, text=True, check=True)
    return done.stdout.splitlines()


def _translate_on_board(board, bundle, source, cpu: str) -> subprocess.CompletedProcess:
    return run_aarch64(["-m", "int8mt", "translate", str(bundle), "-i", str(source)], cpu=cpu, pythonpath=[board])


@pytest.mark.parametrize("preset,cpu_without", PRESETS_RUN)
def test_integer_only_model_on_the_emulated_cpu_is_bit_identical_to_x86(preset, cpu_without, board, source,
                                                                         x86_translations, tmp_path):
    bundle, x86 = _compile_with_x86(preset, INTEGER_ONLY, tmp_path / preset, x86_translations, source)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["target"]["arch"] == "aarch64"
    assert manifest["quantization"]["matmuls_int"] == manifest["quantization"]["matmuls"] == 67
    family = get_preset(preset).int8_dot
    mnemonics = INSTRUCTIONS[family] + INSTRUCTIONS[batch_dot(family).family]
    counts = count_instructions(bundle / "model.so", mnemonics)
    assert all(counts[m] > 0 for m in mnemonics), counts
    assert int8_dot(family).rows == 1 or counts["smmla"] > 0
    report = subprocess.run([sys.executable, "-m", "int8mt", "inspect", str(bundle)], capture_output=True, text=True,
                            check=True).stdout  # read on this x86 machine: inspecting opens no library
    assert "matmuls in INT  67 of 67" in report and f"int8 linear kernels: {family} dot product" in report
    assert f"batched kernel ({batch_dot(family).family} dot product)" in report
    assert "default tiles sized to the vector registers" in report

    done = _translate_on_board(board, bundle, source, CPUS[preset])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == x86

    if cpu_without is not None:  # the runtime checks the CPU's features before it opens the library: no SIGILL
        refused = _translate_on_board(board, bundle, source, cpu_without)
        assert refused.returncode == 2, refused.stderr[-3000:]
        lacking = get_preset(preset).required_features[-1]
        assert f"needs CPU features this CPU lacks ({lacking})" in refused.stderr


@pytest.mark.extended
@pytest.mark.parametrize("preset", ["arm-i8mm", "arm-dotprod", "arm-neon"])
def test_default_model_on_the_emulated_cpu_agrees_with_x86(preset, board, x86_translations, tmp_path_factory,
                                                           tmp_path):
    source = _source(tmp_path_factory, 100)
    bundle, x86 = _compile_with_x86(preset, DEFAULT, tmp_path / preset, x86_translations, source)
    done = _translate_on_board(board, bundle, source, CPUS[preset])
    assert done.returncode == 0, done.stderr[-3000:]
    ours = done.stdout.splitlines()
    assert len(ours) == len(x86) == 100
    assert sum(a == b for a, b in zip(ours, x86)) >= 98


def test_run_time_ranges_model_on_the_emulated_cpu_agrees_with_x86(board, source, x86_translations, tmp_path):
    """Run-time ranges: int8 caches with per-position scales and the quantizing one-query attention kernels, on
    aarch64 (float ops such as the layer norm may round differently there: nearly all sentences equal)."""
    bundle, x86 = _compile_with_x86("arm-i8mm", RUNTIME, tmp_path / "arm-i8mm", x86_translations, source)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["cache_dtype"] == "int8" and manifest["cache_scales"]
    done = _translate_on_board(board, bundle, source, CPUS["arm-i8mm"])
    assert done.returncode == 0, done.stderr[-3000:]
    ours = done.stdout.splitlines()
    assert len(ours) == len(x86) == SENTENCES and sum(a == b for a, b in zip(ours, x86)) >= SENTENCES - 1
