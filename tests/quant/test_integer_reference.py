"""The whole compiled integer graph against the NumPy integer reference (int8mt.quant.integer_model), matmul by
matmul, and the Relax graph before Scale Propagation against the one after it."""
import json

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax

from int8mt.cli import main
from int8mt.compiler.frontend import export_to_relax
from int8mt.compiler.integer_check import check_integer_graph, compile_tapped
from int8mt.compiler.passes import ScalePropagation
from int8mt.compiler.pipeline import CompileOptions, integer_graph, relax_pipeline, tile_choosers
from int8mt.compiler.quant_import import quant_convert_map
from int8mt.model.transformer import Transformer
from int8mt.quant.checkpoint import quantized_model
from int8mt.quant.config import QuantConfig

from ..conftest import DATA_DIR, HOST_PRESET, TINY

STEPS = 3
PER_CALL = {"encode": 8 * TINY.encoder_layers + 2 * TINY.decoder_layers, "decode_step": 12 * TINY.decoder_layers + 1}


def _inputs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    src = rng.integers(4, TINY.vocab_size, (3, 9))
    src[2, 5:] = 0  # padding: the masked attention rows are checked too
    return src, rng.integers(4, TINY.vocab_size, (3, STEPS))


def _model(model_dir, qcfg: QuantConfig):
    return quantized_model(model_dir, qcfg, DATA_DIR, calib_sentences=32)


@pytest.mark.parametrize("qcfg", [
    QuantConfig(ranges="calibrate"),
    pytest.param(QuantConfig(ranges="runtime"), marks=pytest.mark.extended),
    pytest.param(QuantConfig(bits=6, ranges="calibrate"), marks=pytest.mark.extended),
    pytest.param(QuantConfig(ranges="calibrate", integer_softmax=True, integer_layer_norm=True),
                 marks=pytest.mark.extended),
], ids=["int8-calibrate", "int8-runtime", "int6-calibrate", "int8-integer-only"])
def test_every_matmul_matches_the_integer_reference(qcfg, tiny_model_dir):
    model = _model(tiny_model_dir, qcfg)
    vm = compile_tapped(model, HOST_PRESET, *tile_choosers(HOST_PRESET, None), qcfg)
    checks = check_integer_graph(model, vm, *_inputs(), qcfg)
    assert len(checks) == PER_CALL["encode"] + STEPS * PER_CALL["decode_step"]
    # the kernels and the integer ops around them: every int32 result is exactly its operands' product
    assert all(c.exact for c in checks), [c.name for c in checks if not c.exact]
    # the graph: operands equal the reference's, or differ by one step where a float op (layer norm,
    # softmax) rounded differently and a value on a rounding boundary went the other way
    assert max(c.operands_max_diff for c in checks) <= 1
    assert np.mean([c.operands_equal for c in checks]) >= 0.99
    if qcfg.ranges == "runtime":
        return
    # static ranges: integers flow from matmul to matmul, so results agree bit for bit on these inputs
    assert all(c.result_equal == 1.0 for c in checks)
    if qcfg.integer_softmax and qcfg.integer_layer_norm:  # no float op left between matmuls: always exact
        assert all(c.operands_max_diff == 0 for c in checks)


def _vm(mod: tvm.IRModule) -> relax.VirtualMachine:
    target = tvm.target.Target(HOST_PRESET.target)
    return relax.VirtualMachine(tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target)), tvm.cpu())


def _decode(vm: relax.VirtualMachine, model: Transformer, src: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    cross = vm["encode"](tvm.runtime.tensor(src))
    cross = (cross,) if hasattr(cross, "numpy") else tuple(cross)
    cache, history = model.empty_cache(len(src))
    rows = len(src) * tokens.shape[1]  # room for every step's rows, written in place after the ``used`` first
    cache = tuple(tvm.runtime.tensor(np.concatenate([c.numpy(), np.zeros((*c.shape[:2], rows, *c.shape[3:]),
                                                                         c.numpy().dtype)], axis=2)) for c in cache)
    logits = []
    for step in range(tokens.shape[1]):
        used = 1 + step * len(src)
        out, *_ = vm["decode_step"](*(tvm.runtime.tensor(np.ascontiguousarray(a)) for a in (
            tokens[:, step:step + 1], np.array([step]))), *cache, tvm.runtime.tensor(history.numpy()),
            *cross, tvm.runtime.tensor(src), tvm_ffi.Shape((used,)))
        history = Transformer.next_history(history, used)
        logits.append(out.numpy())
    return np.stack(logits)


@pytest.mark.extended  # ~1 min; Scale Propagation's rewrites are checked one by one in the default run
@pytest.mark.parametrize("ranges", ["calibrate", "runtime"])
def test_graph_before_the_pass_agrees_with_the_graph_after_it(ranges, tiny_model_dir):
    model = _model(tiny_model_dir, QuantConfig(ranges=ranges))
    dtype = model.cache_dtype_name
    assert dtype == "int8" and model.cache_scales == (ranges == "runtime")  # run-time: a scale per position
    imported = export_to_relax(model, convert_map=quant_convert_map)
    before = _decode(_vm(imported), model, *_inputs())  # quantize/dequantize round trips, float matmuls
    integer = integer_graph(imported, CompileOptions(HOST_PRESET, QuantConfig(ranges=ranges)))
    after = _decode(_vm(integer), model, *_inputs())
    # float requantization (round half to even) against integer multiply-shift (half up), and biases
    # rounded onto the accumulator's grid: a step here and there, a small fraction of the range
    np.testing.assert_allclose(after, before, atol=0.05 * float(np.abs(before).max()))
    assert np.mean(after.argmax(-1) == before.argmax(-1)) >= 2 / 3


def test_verify_command_reports_every_matmul(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "verify.json"
    assert main(["verify", str(tiny_model_dir), "--target", HOST_PRESET.name, "--ranges", "runtime",
                 "--sentences", "3", "--steps", "2", "--json", str(out)]) == 0
    total = PER_CALL["encode"] + 2 * PER_CALL["decode_step"]
    assert f"{total} of {total} matmul results are exactly" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert len(report["matmuls"]) == total and {r["site"] for r in report["sites"]} >= {"lm_head"}


def test_verify_rejects_bad_counts(tiny_model_dir, capsys):
    assert main(["verify", str(tiny_model_dir), "--steps", "0"]) == 2
    assert "--steps must be at least 1" in capsys.readouterr().err


def test_integer_only_graph_has_no_float_softmax_or_layer_norm(tiny_model_dir):
    from int8mt.compiler.quant_report import op_report

    qcfg = QuantConfig(ranges="calibrate", integer_softmax=True, integer_layer_norm=True)
    mod = export_to_relax(_model(tiny_model_dir, qcfg), convert_map=quant_convert_map)
    report = op_report(ScalePropagation(integer_softmax=True, integer_layer_norm=True)(mod))
    assert not {"relax.nn.softmax", "relax.nn.layer_norm"} & set(report["float_ops"])
    layers_e, layers_d = TINY.encoder_layers, TINY.decoder_layers
    assert report["total"]["softmax_int"] == layers_e + 2 * layers_d
    assert report["total"]["layer_norm_int"] == 2 * layers_e + 3 * layers_d
