"""The shipped reference model, compiled: greedy translations equal PyTorch's on validation sentences."""
import pytest
import torch

from int8mt.data import pad_batch, read_parallel
from int8mt.model.checkpoint import load_model_dir
from int8mt.model.generate import greedy_decode
from int8mt.runtime.bundle import Bundle
from int8mt.runtime.search import greedy_search
from int8mt.tokenizer import Tokenizer

from ..conftest import DATA_DIR, HOST_PRESET, MODEL_DIR

SENTENCES, BATCH, MAX_LEN = 50, 10, 64


@pytest.fixture(scope="module")
def reference_bundle(tmp_path_factory):
    from int8mt.compiler.build import build_bundle

    out = tmp_path_factory.mktemp("reference") / "ende-x86"
    build_bundle(MODEL_DIR, HOST_PRESET, out)
    return out


def _near_tie(model, src_row, prefix, pos_margin=1e-4) -> bool:
    """True when the two best next tokens after ``prefix`` differ by less than ``pos_margin`` in logits."""
    cfg = model.cfg
    tgt = torch.tensor([[cfg.decoder_start_id] + prefix])
    with torch.no_grad():
        logits = model(src_row[None], tgt)[0, -1]
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1]) < pos_margin


def test_compiled_greedy_equals_pytorch_greedy(reference_bundle):
    model = load_model_dir(MODEL_DIR)
    tok = Tokenizer(MODEL_DIR / "spm.model")
    sources, _ = read_parallel(DATA_DIR, "val", "en", "de")
    ids = tok.encode_batch(sources[:SENTENCES])
    bundle = Bundle(reference_bundle)
    mismatches = 0
    for start in range(0, SENTENCES, BATCH):
        src = pad_batch(ids[start:start + BATCH], tok.pad_id)
        expected = greedy_decode(model, torch.from_numpy(src), MAX_LEN)
        got = greedy_search(bundle, src, [MAX_LEN] * len(src))
        for row, (e, g) in enumerate(zip(expected, got)):
            if e != g:
                mismatches += 1
                first = next(i for i in range(min(len(e), len(g)) + 1) if i >= len(e) or i >= len(g) or e[i] != g[i])
                assert _near_tie(model, torch.from_numpy(src[row]), e[:first]), (
                    f"sentence {start + row} differs at token {first} without a near-tie: {e} vs {g}")
    assert mismatches <= 2, f"{mismatches} of {SENTENCES} translations differ"


def test_compiled_bleu_equals_pytorch_bleu_on_the_test_set(reference_bundle):
    from int8mt.model.generate import translate_greedy
    from int8mt.runtime.options import SearchOptions
    from int8mt.runtime.translator import Translator
    from int8mt.metrics import corpus_bleu as bleu

    sources, references = read_parallel(DATA_DIR, "test_2016_flickr", "en", "de")
    model, tok = load_model_dir(MODEL_DIR), Tokenizer(MODEL_DIR / "spm.model")
    with torch.inference_mode():
        reference_bleu = bleu(translate_greedy(model, tok, sources, model.cfg.max_positions, 32), references)
    compiled = Translator(reference_bundle, SearchOptions(beam_size=1), batch_size=32).translate(sources)
    compiled_bleu = bleu(compiled, references)
    assert reference_bleu > 30
    assert abs(compiled_bleu - reference_bleu) <= 0.1, (compiled_bleu, reference_bleu)
