"""The whole compiled integer graph against the NumPy integer reference (int8mt.quant.integer_model), matmul by
matmul, and the Relax graph before Scale Propagation against the one after it."""
import json

import numpy as np
import pytest
import tvm
from tvm import relax

from int8mt.cli import main
from int8mt.compiler.build import lower_integer_graph, tile_chooser
from int8mt.compiler.frontend import export_to_relax
from int8mt.compiler.integer_check import check_integer_graph, compile_tapped
from int8mt.compiler.passes import ScalePropagation
from int8mt.compiler.pipeline import int8mt_pipeline
from int8mt.compiler.quant_import import quant_convert_map
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


def _model(model_dir, bits: int, ranges: str):
    return quantized_model(model_dir, QuantConfig(bits=bits, ranges=ranges), DATA_DIR, calib_sentences=32)


@pytest.mark.parametrize("bits, ranges, integer_softmax",
                         [(8, "calibrate", False), (8, "runtime", False), (6, "calibrate", False), (8, "calibrate", True)])
def test_every_matmul_matches_the_integer_reference(bits, ranges, integer_softmax, tiny_model_dir):
    model = _model(tiny_model_dir, bits, ranges)
    vm = compile_tapped(model, HOST_PRESET, tile_chooser(HOST_PRESET, None), integer_softmax)
    checks = check_integer_graph(model, vm, *_inputs(), integer_softmax)
    assert len(checks) == PER_CALL["encode"] + STEPS * PER_CALL["decode_step"]
    # the kernels and the integer ops around them: every int32 result is exactly its operands' product
    assert all(c.exact for c in checks), [c.name for c in checks if not c.exact]
    # the graph: operands equal the reference's, or differ by one step where a float op (layer norm,
    # softmax) rounded differently and a value on a rounding boundary went the other way
    assert max(c.operands_max_diff for c in checks) <= 1
    assert np.mean([c.operands_equal for c in checks]) >= 0.99
    if ranges == "runtime":
        return
    # static ranges: integers flow from matmul to matmul, so results agree bit for bit on these inputs
    assert all(c.result_equal == 1.0 for c in checks)


def _vm(mod: tvm.IRModule) -> relax.VirtualMachine:
    target = tvm.target.Target(HOST_PRESET.target)
    return relax.VirtualMachine(tvm.compile(mod, target=target, relax_pipeline=int8mt_pipeline(target)), tvm.cpu())


def _decode(vm: relax.VirtualMachine, src: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    cross = vm["encode"](tvm.runtime.tensor(src))
    cache = tvm.runtime.tensor(np.zeros((TINY.decoder_layers, 2, len(src), TINY.heads, 0, TINY.head_dim), np.float32))
    logits = []
    for step in range(tokens.shape[1]):
        out, cache = vm["decode_step"](tvm.runtime.tensor(np.ascontiguousarray(tokens[:, step:step + 1])),
                                       tvm.runtime.tensor(np.array([step])), cache, cross, tvm.runtime.tensor(src))
        logits.append(out.numpy())
    return np.stack(logits)


@pytest.mark.parametrize("ranges", ["calibrate", "runtime"])
def test_graph_before_the_pass_agrees_with_the_graph_after_it(ranges, tiny_model_dir):
    imported = export_to_relax(_model(tiny_model_dir, 8, ranges), convert_map=quant_convert_map)
    before = _decode(_vm(imported), *_inputs())  # quantize/dequantize round trips, float matmuls
    integer = lower_integer_graph(ScalePropagation()(imported), HOST_PRESET, tile_chooser(HOST_PRESET, None))
    after = _decode(_vm(integer), *_inputs())
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
