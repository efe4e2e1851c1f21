"""The shipped reference model in INT8 with its learned ranges: every matmul in integers, BLEU within 99.3 %
of FP32, and the compiled integer graph translating like the quantized PyTorch model."""
import json

import pytest
import torch

from int8mt.data import read_parallel
from int8mt.metrics import corpus_bleu
from int8mt.model.generate import translate_greedy
from int8mt.quant.checkpoint import learned_dir, load_quantized
from int8mt.quant.config import QuantConfig
from int8mt.runtime.options import SearchOptions
from int8mt.runtime.translator import Translator

from ..conftest import DATA_DIR, HOST_PRESET, MODEL_DIR

FP32_TEST_BLEU = json.loads((MODEL_DIR / "training.json").read_text())["test_2016_flickr_bleu_greedy"]


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory):
    from int8mt.compiler.build import build_bundle

    out = tmp_path_factory.mktemp("reference-int8") / "ende-int8"
    build_bundle(MODEL_DIR, HOST_PRESET, out, qcfg=QuantConfig(ranges="learned"), data_dir=DATA_DIR)
    return out


def test_all_matmuls_int8_and_bundle_small(int8_bundle):
    q = json.loads((int8_bundle / "manifest.json").read_text())["quantization"]
    assert q["matmuls_int"] == q["matmuls"] == 8 * 3 + 14 * 3 + 1
    weights = (MODEL_DIR / "model.safetensors").stat().st_size
    assert (int8_bundle / "model.so").stat().st_size < 0.4 * weights


def test_linear_layers_use_the_shipped_tuned_kernels(int8_bundle):
    """Every preset ships a database with the reference model's kernels."""
    kernels = json.loads((int8_bundle / "report.json").read_text())["kernels"]
    assert len(kernels) == 7 and all(k["tuned"] for k in kernels)  # 3 encoder + 4 decoder weight shapes
    assert {k["dot"] for k in kernels} == {HOST_PRESET.int8_dot}


def test_int8_bleu_and_agreement_with_quantized_pytorch(int8_bundle):
    sources, references = read_parallel(DATA_DIR, "test_2016_flickr", "en", "de")
    compiled = Translator(int8_bundle, SearchOptions(beam_size=1), batch_size=32).translate(sources)
    assert corpus_bleu(compiled, references) >= 0.993 * FP32_TEST_BLEU

    model, _ = load_quantized(learned_dir(MODEL_DIR, 8))
    tok_file = MODEL_DIR / "spm.model"
    from int8mt.tokenizer import Tokenizer

    with torch.inference_mode():
        pytorch = translate_greedy(model, Tokenizer(tok_file), sources[:200], model.cfg.max_positions, 32)
    same = sum(a == b for a, b in zip(pytorch, compiled[:200]))
    assert same >= 0.9 * 200, f"only {same} of 200 translations equal the quantized PyTorch model's"
