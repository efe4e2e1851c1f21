"""Hugging Face Marian (OPUS-MT) directories as users have them: tokenization identical to
``transformers.MarianTokenizer``, FP32 bundles' greedy and beam-4 outputs token-identical to
``MarianMTModel.generate``, and an INT8 bundle of a multilingual model compiled, inspected and run through
the CLI as a user would (calibrated on the user's sentences, ``--target-lang``)."""
import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from int8mt.cli import main  # noqa: E402
from int8mt.data import pad_batch  # noqa: E402
from int8mt.runtime.options import SearchOptions  # noqa: E402
from int8mt.runtime.search import beam_search  # noqa: E402
from int8mt.runtime.translator import Translator  # noqa: E402
from int8mt.tokenizer import MarianTokenizer  # noqa: E402

from ..conftest import DATA_DIR, HOST_PRESET  # noqa: E402
from ..marian_dirs import build_marian_dir  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Recommended. pip install sacremoses")

SENTENCES = (DATA_DIR / "test_2016_flickr.en").read_text().splitlines()[:24]
ODD = ["Ünïcödé ﬁ №  \u2028 x\u200b y", "", "   ", "Hello </s> world<unk>x<pad>", "emoji 😀 and 中文 \t tabs",
       ">>fra<<", ">>spa<< leading code", "  >>deu<<not at the start", "a\u0301 e\u0308 ＡＢＣ　full width",
       "<s> bos </S>"]
KINDS = ("shared", "separate", "multilingual")


@pytest.fixture(scope="module")
def marian_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("marian-dirs")
    return {kind: build_marian_dir(root / kind, kind) for kind in KINDS}


@pytest.fixture(scope="module")
def fp32_bundles(marian_dirs, tmp_path_factory):
    """kind -> its FP32 bundle, built when a test first asks (the extended run's kinds only there)."""
    from int8mt.compiler.build import build_bundle

    root = tmp_path_factory.mktemp("marian-bundles")

    @functools.cache
    def bundle(kind: str) -> Path:
        build_bundle(marian_dirs[kind], HOST_PRESET, root / kind)
        return root / kind

    return bundle


@pytest.mark.parametrize("kind", KINDS)
def test_tokenization_equals_marian_tokenizer(marian_dirs, kind):
    theirs = transformers.MarianTokenizer.from_pretrained(marian_dirs[kind])
    ours = MarianTokenizer(marian_dirs[kind])
    targets = (DATA_DIR / "test_2016_flickr.de").read_text().splitlines()[:24]
    for text in SENTENCES + ODD:
        assert ours.encode(text) == theirs(text).input_ids, text
    for text in targets + ODD:
        ids = theirs(text_target=text).input_ids
        assert ours.encode_target(text) == ids, text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
    rng = np.random.default_rng(0)
    for _ in range(50):  # any ids the model may produce, specials and language tokens included
        ids = rng.integers(0, len(theirs.decoder) if kind != "separate" else len(theirs.target_encoder), 12).tolist()
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), ids


def test_language_tokens_and_their_errors(marian_dirs):
    ours = MarianTokenizer(marian_dirs["multilingual"])
    theirs = transformers.MarianTokenizer.from_pretrained(marian_dirs["multilingual"])
    assert ours.target_languages == (">>deu<<", ">>fra<<", ">>spa<<")
    assert ours.encode("A dog.", target_lang="fra") == theirs(">>fra<< A dog.").input_ids
    assert ours.encode("A dog.", target_lang=">>spa<<") == theirs(">>spa<< A dog.").input_ids
    with pytest.raises(ValueError, match="not a language of this model; use one of deu, fra, spa"):
        ours.encode("A dog.", target_lang="ita")
    with pytest.raises(ValueError, match="no target-language tokens"):
        MarianTokenizer(marian_dirs["shared"]).encode("A dog.", target_lang="fra")


def _generate(model, tokenizer, text: str, max_new: int, beam: int) -> list[int]:
    batch = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, num_beams=beam, do_sample=False, max_new_tokens=max_new, length_penalty=0.0,
                             early_stopping=True, forced_eos_token_id=None)
    ids = out[0, 1:].tolist()  # after the decoder start
    return ids[:ids.index(model.config.eos_token_id)] if model.config.eos_token_id in ids else ids


# the multilingual model's language tokens are also translated through the CLI in INT8 (below): its FP32 build
# (~40 s) is extended, for time
@pytest.mark.parametrize("kind", (pytest.param("multilingual", marks=pytest.mark.extended), "separate"))
@pytest.mark.parametrize("beam", (1, 4))
def test_fp32_bundle_equals_transformers_generate(marian_dirs, fp32_bundles, kind, beam):
    """Token-identical search results (length penalty 0: transformers and GNMT normalise length differently).
    The multilingual model (one shared vocabulary, like opus-mt-en-de, plus language tokens) translates into
    French: ``--target-lang fra`` here, a ``>>fra<<`` prefix for transformers."""
    model = transformers.MarianMTModel.from_pretrained(marian_dirs[kind]).eval()
    tokenizer = transformers.MarianTokenizer.from_pretrained(marian_dirs[kind])
    target_lang, prefix = ("fra", ">>fra<< ") if kind == "multilingual" else (None, "")
    translator = Translator(fp32_bundles(kind), SearchOptions(beam_size=beam, length_penalty=0.0),
                            target_lang=target_lang)
    options, bundle = translator.options, translator.bundle
    ids = [translator.source_ids(s) for s in SENTENCES]
    src = pad_batch(ids, bundle.pad_id)
    max_lens = options.max_lengths(src, bundle.pad_id, bundle.max_positions)
    ours = beam_search(bundle, src, max_lens, options)
    theirs = [_generate(model, tokenizer, prefix + s, n, beam) for s, n in zip(SENTENCES, max_lens)]
    if beam > 1:  # some sentences end with </s> before the limit
        assert any(len(t) < n for t, n in zip(theirs, max_lens))
    assert ours == theirs
    texts = translator.translate(SENTENCES)
    assert texts == [tokenizer.decode(t, skip_special_tokens=True) for t in theirs]


def test_int8_multilingual_model_through_the_cli(marian_dirs, tmp_path, capsys):
    calib = tmp_path / "calib.en"
    calib.write_text("\n".join((DATA_DIR / "val.en").read_text().splitlines()[:48]) + "\n")
    bundle = tmp_path / "bundle"
    assert main(["compile", str(marian_dirs["multilingual"]), "--target", HOST_PRESET.name, "--calib-data",
                 str(calib), "-o", str(bundle)]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["tokenizer"] == "marian" and manifest["quantization"]["ranges"] == "calibrate"
    assert manifest["quantization"]["matmuls_int"] == manifest["quantization"]["matmuls"] > 0
    assert {"source.spm", "target.spm", "vocab.json"} <= set(manifest["files"])
    capsys.readouterr()
    assert main(["translate", str(bundle), "A man is riding a bike."]) == 2
    assert "needs a target language: pass --target-lang with one of deu, fra, spa" in capsys.readouterr().err
    assert main(["translate", str(bundle), "--target-lang", "ita", "A man."]) == 2
    assert "not a language of this model" in capsys.readouterr().err
    assert main(["translate", str(bundle), "--target-lang", "fra", "A man is riding a bike.", "",
                 ">>spa<< A dog."]) == 0
    out = capsys.readouterr().out.split("\n")
    translator = Translator(bundle, target_lang="fra")
    theirs = transformers.MarianTokenizer.from_pretrained(marian_dirs["multilingual"])
    assert translator.source_ids(" A dog. ") == theirs(">>fra<< A dog.").input_ids  # what serve counts for 413
    assert translator.source_ids(">>spa<< A dog.") == theirs(">>spa<< A dog.").input_ids
    assert out[:3] == [translator.translate(["A man is riding a bike."], target_lang="fra")[0], "",
                       translator.translate(["A dog."], target_lang="spa")[0]]


def test_runtime_ranges_are_the_default_without_learned_ones(marian_dirs, capsys):
    from int8mt.config import CompileConfig
    from int8mt.interface.compile import QuantRequest

    qcfg = QuantRequest("int8").config(CompileConfig(ranges="learned"), marian_dirs["separate"])
    assert qcfg.ranges == "runtime" and "using run-time ranges" in capsys.readouterr().err
    assert QuantRequest("int8", ranges="learned").config(CompileConfig(), marian_dirs["separate"]).ranges == "learned"


@pytest.mark.parametrize("args, message", [
    (["--ranges", "calibrate"], "pass --calib-data FILE"),
    (["--calib-data", "{empty}"], "has no sentences to calibrate on"),
    (["--calib-data", "{calib}", "--ranges", "runtime"], "--calib-data is for --ranges calibrate"),
    (["--calib-data", "{calib}", "--quant", "fp32"], "need --quant int8 or --quant int6"),
])
def test_calibration_options_are_checked(marian_dirs, tmp_path, capsys, args, message):
    (tmp_path / "empty.en").write_text("\n\n")
    (tmp_path / "calib.en").write_text("A dog.\n")
    args = [a.format(empty=tmp_path / "empty.en", calib=tmp_path / "calib.en") for a in args]
    assert main(["compile", str(marian_dirs["shared"]), "-o", str(tmp_path / "b"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_qat_on_the_users_parallel_text(marian_dirs, tmp_path, capsys):
    """On the separate-vocabulary model: targets through their own vocabulary; both embedding tables int8."""
    model_dir = marian_dirs["separate"]
    src, tgt = tmp_path / "my.en", tmp_path / "my.de"
    src.write_text("\n".join((DATA_DIR / "train.en").read_text().splitlines()[:200]) + "\n")
    tgt.write_text("\n".join((DATA_DIR / "train.de").read_text().splitlines()[:200]) + "\n")
    assert main(["qat", str(model_dir)]) == 2
    assert "pass --train-src FILE and --train-tgt FILE" in capsys.readouterr().err
    assert main(["qat", str(model_dir), "--train-src", str(src)]) == 2
    assert "--train-src and --train-tgt go together" in capsys.readouterr().err
    short = tmp_path / "short.de"
    short.write_text("Ein Hund.\n")
    assert main(["qat", str(model_dir), "--train-src", str(src), "--train-tgt", str(short)]) == 2
    assert "has 200 lines but" in capsys.readouterr().err
    learned = tmp_path / "learned"
    assert main(["qat", str(model_dir), "--train-src", str(src), "--train-tgt", str(tgt), "-o", str(learned)]) == 0
    record = json.loads((learned / "quant.json").read_text())
    assert record["ranges"] == "learned" and "val_bleu_learned" in record
    assert {"source.spm", "target.spm", "vocab.json"} <= {p.name for p in learned.iterdir()}
    (model_dir / "qat-int8").symlink_to(learned)  # where `compile --ranges learned` looks
    try:
        bundle = tmp_path / "bundle"
        assert main(["compile", str(model_dir), "--ranges", "learned", "--target", HOST_PRESET.name, "-o",
                     str(bundle)]) == 0
    finally:
        (model_dir / "qat-int8").unlink()
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["quantization"]["ranges"] == "learned" and manifest["cache_dtype"] == "int8"
    assert manifest["quantization"]["matmuls_int"] == manifest["quantization"]["matmuls"]
    out = Translator(bundle, SearchOptions(beam_size=1)).translate(SENTENCES[:4])
    assert len(out) == 4 and any(out)  # a random model may end a sentence at once
