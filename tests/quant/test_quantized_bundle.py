"""Quantized bundles of the tiny model: every matmul in integers after the pass, the compiled integer graph
agrees with the quantized PyTorch model, and `int8mt inspect` reports it."""
import json

import numpy as np
import pytest
import torch

from int8mt.cli import main
from int8mt.quant.checkpoint import quantized_model
from int8mt.quant.config import QuantConfig
from int8mt.runtime.bundle import Bundle

from ..conftest import DATA_DIR, HOST_PRESET, INT8_PRESETS, TINY

MATMULS = 8 * TINY.encoder_layers + 14 * TINY.decoder_layers + 1
ATTENTION_MATMULS = 2 * TINY.encoder_layers + 4 * TINY.decoder_layers  # QK^T and softmax·V per attention


QCFGS = {"calibrate": QuantConfig(ranges="calibrate"), "runtime": QuantConfig(ranges="runtime"),  # int8 caches
         "runtime-fp32": QuantConfig(ranges="runtime", runtime_attention="float32")}  # float32 attention, caches


@pytest.fixture(scope="module", params=list(QCFGS))
def quantized(request, tiny_model_dir, tmp_path_factory):
    from int8mt.compiler.build import build_bundle

    qcfg = QCFGS[request.param]
    out = tmp_path_factory.mktemp("qbundles") / request.param
    build_bundle(tiny_model_dir, HOST_PRESET, out, qcfg=qcfg, data_dir=DATA_DIR, calib_sentences=32)
    torch.manual_seed(0)
    model = quantized_model(tiny_model_dir, qcfg, DATA_DIR, calib_sentences=32)
    return out, model


def _src() -> np.ndarray:
    src = np.random.default_rng(3).integers(4, 8000, (3, 9))
    src[2, 5:] = 0
    return src


def test_every_matmul_is_integer(quantized):
    """Every matmul, or with run-time ranges and FP32 attention every linear layer."""
    out, _ = quantized
    q = json.loads((out / "manifest.json").read_text())["quantization"]
    float_matmuls = ATTENTION_MATMULS if out.name == "runtime-fp32" else 0
    assert q["matmuls"] == MATMULS and q["matmuls_int"] == MATMULS - float_matmuls
    assert q["keep_fp32"] == (["*.qk", "*.av"] if float_matmuls else [])
    report = json.loads((out / "report.json").read_text())
    assert report["before"]["total"]["matmul_float"] == MATMULS
    assert report["after"]["total"].get("matmul_float", 0) == float_matmuls
    dequantize_before, dequantize_after = (report[k]["total"]["dequantize"] for k in ("before", "after"))
    if out.name == "calibrate":  # static scales: integers flow from matmul to matmul
        assert report["after"]["total"]["requantize"] > 0 and dequantize_after < dequantize_before / 2
    else:  # run-time ranges: each matmul output is dequantized to find the next range
        assert dequantize_after < dequantize_before
    assert report["after"]["constant_bytes"]["int8"] > 0.9 * TINY.vocab_size * TINY.d_model


def test_compiled_graph_agrees_with_quantized_pytorch(quantized):
    out, model = quantized
    bundle = Bundle(out)
    src = _src()
    with torch.no_grad():
        cross = model.cross_kv(model.encode(torch.from_numpy(src)))
        logits, _ = model.decode_step(torch.full((3, 1), TINY.decoder_start_id), torch.tensor([0]),
                                      *model.empty_cache(3), cross, torch.from_numpy(src))
    got_cross = bundle.encode(src)
    # integer requantization (round half up, multiplier-shift) may differ by one step from PyTorch's float
    # rounding now and then; the values agree to a small fraction of their range
    for got_part, part in zip(got_cross, cross, strict=True):
        np.testing.assert_allclose(got_part.numpy(), part.numpy(), atol=0.05 * float(part.abs().max()))
    cache = bundle.empty_cache(3, positions=4)
    got = bundle.decode_step(np.full((3, 1), TINY.decoder_start_id), 0, cache, got_cross, bundle.tensor(src))
    assert cache.used == 4 and cache.history.tolist() == [[1, 0], [2, 0], [3, 0]]
    np.testing.assert_allclose(got, logits.numpy(), atol=0.05 * float(logits.abs().max()))
    assert np.mean(got.argmax(-1) == logits.numpy().argmax(-1)) >= 2 / 3


LINEARS = 4 * TINY.encoder_layers + 8 * TINY.decoder_layers + 1  # matmuls with a weight (not QK^T, softmax.V)


@pytest.mark.skipif(HOST_PRESET.int8_dot is None, reason="no preset with int8 kernels fits this CPU")
def test_linear_layers_run_the_int8_kernel(quantized):
    out, _ = quantized
    report = json.loads((out / "report.json").read_text())
    sites = {(k["function"], k["n"], k["k"]) for k in report["kernels"]}
    assert sites == {("encode", 32, 32), ("encode", 64, 32), ("encode", 32, 64), ("decode_step", 32, 32),
                     ("decode_step", 64, 32), ("decode_step", 32, 64), ("decode_step", TINY.vocab_size, 32)}
    float_matmuls = ATTENTION_MATMULS if out.name == "runtime-fp32" else 0
    assert report["after"]["total"]["matmul_int"] == MATMULS - float_matmuls  # LINEARS of them became kernels
    assert LINEARS < MATMULS


# x86-avx512's kernels are x86-avx2's at twice the width (their kernel tests run both): extended, for time
OTHER_INT8_PRESETS = [pytest.param(*p.values, id=p.id, marks=[*p.marks, pytest.mark.extended])
                      if p.values[0].name == "x86-avx512" else p
                      for p in INT8_PRESETS if p.values[0].name != HOST_PRESET.name]


@pytest.mark.parametrize("preset", OTHER_INT8_PRESETS)
def test_other_int8_presets_compute_what_the_host_preset_computes(preset, quantized, tiny_model_dir, tmp_path):
    """Every other preset's kernels in a whole model give the host preset's results: the integer kernels are
    exact; float ops may round differently under another -mcpu. 20 rows: AMX kernels run tiles from 8."""
    from int8mt.compiler.build import build_bundle

    out, _ = quantized
    if out.name != "runtime":
        pytest.skip("one range method is enough to compare kernels")
    build_bundle(tiny_model_dir, preset, tmp_path / "b", qcfg=QuantConfig(ranges="runtime"))
    kernels = json.loads((tmp_path / "b" / "report.json").read_text())["kernels"]
    assert len(kernels) == 7 and {k["dot"] for k in kernels} == {preset.int8_dot}
    results = []
    for bundle in (Bundle(out), Bundle(tmp_path / "b")):
        src = np.concatenate([_src()] * 7)[:20]
        cross = bundle.encode(src)
        logits = bundle.decode_step(np.full((20, 1), TINY.decoder_start_id), 0, bundle.empty_cache(20, 1), cross,
                                    bundle.tensor(src))
        results.append((cross[0].numpy(), logits))
    (cross, logits), (other_cross, other_logits) = results
    np.testing.assert_allclose(other_cross, cross, rtol=1e-4, atol=1e-4 * float(np.abs(cross).max()))
    np.testing.assert_allclose(other_logits, logits, rtol=1e-4, atol=1e-4 * float(np.abs(logits).max()))


def test_inspect_prints_the_report(quantized, capsys):
    out, _ = quantized
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "layer_norm" in text and "softmax" in text
    if out.name == "runtime-fp32":
        integer = MATMULS - ATTENTION_MATMULS
        assert f"matmuls in INT  {integer} of {MATMULS}  (kept FP32: *.qk, *.av)" in text
        assert "attention matmuls (QK^T, softmax.V) in FP32" in text
        return
    assert f"matmuls in INT  {MATMULS} of {MATMULS}" in text
    if HOST_PRESET.int8_dot:
        assert f"int8 linear kernels: {HOST_PRESET.int8_dot} dot product, weights packed at compile time" in text
        assert "int8 attention matmuls (QK^T, softmax.V) on the batched kernel" in text
        assert "encode 0" not in text  # the encoder's self-attention runs on it


def test_quantization_flags_need_quant(capsys, tiny_model_dir, tmp_path):
    args = ["compile", str(tiny_model_dir), "--quant", "fp32", "-o", str(tmp_path / "b")]
    assert main(args + ["--ranges", "runtime"]) == 2
    assert "need --quant int8 or --quant int6" in capsys.readouterr().err


def test_db_must_exist_and_needs_kernels_of_ours(capsys, tiny_model_dir, tmp_path):
    args = ["compile", str(tiny_model_dir), "--quant", "fp32", "--db", str(tmp_path / "x"), "-o", str(tmp_path / "b")]
    assert main(args) == 2  # FP32 layers use the database's float32 kernels
    assert "no tuning database in" in capsys.readouterr().err
    args = ["compile", str(tiny_model_dir), "--quant", "fp32", "--target", "cuda-sm80", "--db", str(tmp_path)]
    assert main(args + ["-o", str(tmp_path / "b")]) == 2
    assert "FP32 layers on cuda-sm80 do not run ours, so it needs --quant" in capsys.readouterr().err
    if HOST_PRESET.int8_dot:
        args = ["compile", str(tiny_model_dir), "--quant", "int8", "--ranges", "runtime", "--db", str(tmp_path / "x")]
        assert main(args + ["-o", str(tmp_path / "b")]) == 2
        assert "no tuning database in" in capsys.readouterr().err


def test_inspect_rejects_a_non_bundle(capsys, tmp_path):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err


def test_build_names_untuned_kernels_and_tune_picks_exactly_them(quantized, tiny_model_dir):
    from int8mt.compiler.quant_report import untuned_kernels_warning
    from int8mt.interface.tune import dense_tasks

    tiny_bundle, _ = quantized
    if tiny_bundle.name != "runtime":
        pytest.skip("one bundle is enough")
    kernels = json.loads((tiny_bundle / "report.json").read_text())["kernels"]
    tuned = {**kernels[0], "tuned": True}
    warning = untuned_kernels_warning([tuned, *kernels[1:]], HOST_PRESET.name, tiny_bundle)
    untuned = kernels[1:]
    assert f"{len(untuned)} of {len(kernels)} int8 dense kernels have no tuned tiles" in warning
    assert f"{untuned[0]['n']}x{untuned[0]['k']} in {untuned[0]['function']}" in warning
    assert f"int8mt tune {tiny_bundle} --target {HOST_PRESET.name} --untuned-only" in warning
    assert untuned_kernels_warning([tuned], HOST_PRESET.name, tiny_bundle) is None
    assert all(k["calls"] >= 1 for k in kernels)
    every = dense_tasks(tiny_bundle, HOST_PRESET)
    assert dense_tasks(tiny_bundle, HOST_PRESET, untuned_only=True) == every  # the tiny shapes are nowhere tuned
    with pytest.raises(ValueError, match="--untuned-only picks kernels from a bundle"):
        dense_tasks(tiny_model_dir, HOST_PRESET, untuned_only=True)
