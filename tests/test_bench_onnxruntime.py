"""The comparison with ONNX Runtime: the same weights exported to ONNX (float32 runs as PyTorch runs them, greedy
and beam search as a plain reference searches), INT8 with every linear layer quantized by ONNX Runtime, and
``int8mt bench --against onnxruntime`` end to end on a tiny model."""
import copy
import json
import sys

import numpy as np
import onnx
import pytest
import torch

onnxruntime = pytest.importorskip("onnxruntime")

from int8mt.cli import main  # noqa: E402
from int8mt.errors import UserError  # noqa: E402
from int8mt.interface.onnxruntime_model import (CONFIG_FILE, DECODER_FILE, ENCODER_FILE,  # noqa: E402
                                                export_to_onnxruntime, import_onnxruntime)
from int8mt.interface.onnxruntime_translator import OnnxRuntimeTranslator  # noqa: E402
from int8mt.model.checkpoint import load_model_dir, save_model_dir  # noqa: E402
from int8mt.model.generate import greedy_decode  # noqa: E402
from int8mt.runtime.options import SearchOptions  # noqa: E402
from int8mt.tokenizer import load_tokenizer  # noqa: E402

from .conftest import DATA_DIR, MODEL_DIR, as_cuda_sm90, edit_manifest  # noqa: E402
from .marian_dirs import build_marian_dir  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Recommended. pip install sacremoses")  # (build_marian_dir's)
GREEDY = SearchOptions(beam_size=1, length_penalty=0.6)
SENTENCES = (DATA_DIR / "test_2016_flickr.en").read_text().splitlines()[:8]


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnxruntime")
    return {p: export_to_onnxruntime(tiny_model_dir, folder / p, p) for p in ("float32", "int8")}


@pytest.fixture(scope="module")
def ending(tiny_model, tmp_path_factory):
    """The tiny model made to end sentences, exported in float32: the end of sentence's logit raised by 4.4 (beam
    search ends hypotheses after 3-10 tokens, or not at all) and by 5.2 (greedy ends most at once). Returns the
    bias -> (model directory, export)."""
    folder = tmp_path_factory.mktemp("ending")
    made = {}
    for bias in (4.4, 5.2):
        model = copy.deepcopy(tiny_model)
        with torch.no_grad():
            model.lm_head.bias[model.cfg.eos_id] = bias
        model_dir = folder / f"model-{bias}"
        save_model_dir(model, model_dir, MODEL_DIR / "spm.model")
        made[bias] = model_dir, export_to_onnxruntime(model_dir, folder / f"onnx-{bias}", "float32")
    return made


@pytest.fixture(scope="module")
def sources(tiny_model_dir):
    return [load_tokenizer(tiny_model_dir).encode(s) for s in SENTENCES]


def _fixed(beam: int, tokens: int) -> SearchOptions:
    """Exactly ``tokens`` output tokens (as ``bench --fixed-tokens`` asks)."""
    return SearchOptions(beam_size=beam, max_length_a=0.0, max_length_b=tokens, min_length=tokens)


def _limit(ids: list[int], positions: int) -> int:
    return SearchOptions().max_length(len(ids), positions)


def test_float32_greedy_equals_pytorch(exported, tiny_model_dir, sources):
    model = load_model_dir(tiny_model_dir)
    expected = [greedy_decode(model, torch.tensor([ids]), _limit(ids, model.cfg.max_positions))[0] for ids in sources]
    translator = OnnxRuntimeTranslator(exported["float32"])
    assert translator.translate(sources, batch=3, options=GREEDY) == expected


@pytest.mark.extended  # (~15 s; the tiny model's export runs as PyTorch in the default run)
def test_an_opus_mt_layout_directory_exports_and_runs_as_pytorch(tmp_path):
    """A Hugging Face Marian directory (OPUS-MT's layout: final logits bias, decoder started from <pad>)."""
    model_dir = build_marian_dir(tmp_path / "marian", "shared")
    model = load_model_dir(model_dir)
    sources = [load_tokenizer(model_dir).encode(s) for s in SENTENCES[:4]]
    expected = [greedy_decode(model, torch.tensor([ids]), _limit(ids, model.cfg.max_positions))[0] for ids in sources]
    translator = OnnxRuntimeTranslator(export_to_onnxruntime(model_dir, tmp_path / "onnx", "float32"))
    assert translator.translate(sources, batch=2, options=GREEDY) == expected


def _reference_beam(model, ids: list[int], k: int, alpha: float, max_len: int) -> list[int]:
    """Beam search one hypothesis at a time over the teacher-forced PyTorch model: each step the 2k best of all
    continuations (a stable sort: row, then token order), walked until k continue or k have ended."""
    cfg = model.cfg
    src = torch.tensor([ids])
    hyps, finished = [([], 0.0)], []
    for step in range(max_len):
        candidates = []
        for row, (tokens, score) in enumerate(hyps):
            with torch.no_grad():
                logits = model(src, torch.tensor([[cfg.decoder_start_id, *tokens]]))[0, -1]
            log_probs = (logits - torch.logsumexp(logits, -1)).tolist()
            candidates += [(score + lp, row, t) for t, lp in enumerate(log_probs)]
        candidates.sort(key=lambda c: -c[0])
        penalty = ((5.0 + step + 1) / 6.0) ** alpha
        continued = []
        for score, row, token in candidates[:2 * k]:
            if len(continued) == k or len(finished) >= k:
                break
            if token == cfg.eos_id:
                finished.append((score / penalty, hyps[row][0]))
            else:
                continued.append((hyps[row][0] + [token], score))
        if len(finished) < k and step + 1 >= max_len:
            finished += [(score / penalty, tokens) for tokens, score in continued]
        if len(finished) >= k or step + 1 >= max_len:
            return max(finished, key=lambda f: f[0])[1]
        hyps = continued
    raise AssertionError("unreachable")


@pytest.mark.parametrize("alpha", [pytest.param(0.6, marks=pytest.mark.extended), 1.0])
def test_float32_beam_search_equals_a_plain_reference(ending, sources, alpha):
    """Hypotheses end at different lengths, so the length penalty decides (with 1.0 a penalty of ``length ** alpha``
    in place of GNMT's picks other outputs for 7 of the 8)."""
    model_dir, onnx_dir = ending[4.4]
    model = load_model_dir(model_dir)
    expected = [_reference_beam(model, ids, 3, alpha, _limit(ids, model.cfg.max_positions)) for ids in sources]
    assert len({len(out) for out in expected}) > 3
    translator = OnnxRuntimeTranslator(onnx_dir)
    options = SearchOptions(beam_size=3, length_penalty=alpha)
    assert translator.translate(sources, batch=4, options=options) == expected


def test_no_end_of_sentence_before_the_minimum_length(ending, sources):
    for bias, beam in ((5.2, 1), (5.2, 3), (4.4, 3)):
        translator = OnnxRuntimeTranslator(ending[bias][1])
        free = translator.translate(sources, batch=3, options=SearchOptions(beam_size=beam, length_penalty=0.6))
        assert min(len(out) for out in free) < 5  # (the model ends earlier where it may)
        fixed = translator.translate(sources, batch=3, options=_fixed(beam, 5))
        assert [len(out) for out in fixed] == [5] * len(sources)


def test_int8_export_quantizes_every_linear_layer(exported, tiny_model_dir):
    """Every linear layer is an integer matmul (``MatMulInteger``); the only float ``MatMul`` left multiply
    activations (attention), none has a weight."""
    cfg = load_model_dir(tiny_model_dir).cfg
    linear = {ENCODER_FILE: 6 * cfg.encoder_layers + 2 * cfg.decoder_layers,  # + the cross-attention keys, values
              DECODER_FILE: 8 * cfg.decoder_layers + 1}  # + the logits
    for name, count in linear.items():
        graph = onnx.load(str(exported["int8"] / name)).graph
        weights = {i.name for i in graph.initializer}
        ops = [node.op_type for node in graph.node]
        assert ops.count("MatMulInteger") == count, name
        assert not [n.name for n in graph.node if n.op_type == "MatMul" and set(n.input) & weights], name
    for name in linear:
        float_graph = onnx.load(str(exported["float32"] / name)).graph
        assert "MatMulInteger" not in {node.op_type for node in float_graph.node}
    settings = json.loads((exported["int8"] / CONFIG_FILE).read_text())
    assert settings["precision"] == "int8" and settings["onnxruntime"] == onnxruntime.__version__


def test_replicas_fixed_tokens_and_beams_in_int8(exported, sources):
    one, two = OnnxRuntimeTranslator(exported["int8"]), OnnxRuntimeTranslator(exported["int8"], replicas=2)
    for beam in (1, 2):
        fixed = two.translate(sources, batch=3, options=_fixed(beam, 5))
        assert [len(out) for out in fixed] == [5] * len(sources)
        assert fixed == one.translate(sources, batch=3, options=_fixed(beam, 5))


def test_float32_batching_never_changes_a_result(exported, sources):
    """(In INT8 it can: ONNX Runtime's dynamic quantization takes one range per activation tensor, over the batch.)"""
    translator = OnnxRuntimeTranslator(exported["float32"])
    options = SearchOptions(beam_size=2, length_penalty=0.6)
    batched = translator.translate(sources, batch=8, options=options)
    assert batched == [translator.translate([ids], batch=1, options=options)[0] for ids in sources]


def test_bench_against_onnxruntime(tiny_model_dir, tiny_bundle, tmp_path, capsys):
    out = tmp_path / "against.json"
    assert main(["bench", str(tiny_bundle), "--against", "onnxruntime", "--model", str(tiny_model_dir),
                 "--sentences", "10", "--batch-sizes", "1,4", "--beam", "2", "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert "| scenario | ONNX Runtime FP32 sent/s | int8mt FP32 sent/s |" in captured.out  # (an FP32 bundle)
    assert "exporting" in captured.err and "Traceback" not in captured.err
    result = json.loads(out.read_text())
    assert result["peer"] == "onnxruntime" and result["peer_version"] == onnxruntime.__version__
    assert [row["scenario"] for row in result["rows"]] == ["greedy, batch 1", "greedy, batch 4", "beam 2, batch 4"]
    for row in result["rows"]:
        for engine in ("int8mt", "onnxruntime"):
            assert row[engine]["sentences_per_second"] > 0 and 20 < row[engine]["peak_rss_mib"] < 4000
            assert 0 <= row[engine]["bleu"] <= 100
    assert {run["engine"] for run in result["runs"]} == {"int8mt", "onnxruntime"}


def test_bench_against_onnxruntime_refuses_a_cuda_bundle(tiny_model_dir, bundle_copy, capsys):
    edit_manifest(bundle_copy, as_cuda_sm90)
    assert main(["bench", str(bundle_copy), "--against", "onnxruntime", "--model", str(tiny_model_dir),
                 "--sentences", "2"]) == 2
    err = capsys.readouterr().err
    assert "is a CUDA bundle; the ONNX Runtime comparison runs on the CPU" in err and "exporting" not in err


def test_more_fixed_tokens_than_positions_is_refused_before_exporting(tiny_model_dir, tiny_bundle, capsys):
    assert main(["bench", str(tiny_bundle), "--against", "onnxruntime", "--model", str(tiny_model_dir),
                 "--fixed-tokens", "65", "--sentences", "2"]) == 2
    err = capsys.readouterr().err
    assert "--fixed-tokens 65 is more than the model's 64 positions (its longest output): use at most 64" in err
    assert "exporting" not in err


def test_without_onnxruntime_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(UserError, match=r"pip install 'int8mt\[bench\]'"):
        import_onnxruntime()


def test_a_folder_that_is_no_export_is_refused(tmp_path):
    with pytest.raises(UserError, match="is not an exported ONNX Runtime model"):
        OnnxRuntimeTranslator(tmp_path)
    with pytest.raises(UserError, match="ONNX Runtime runs the comparison in int8 or float32"):
        export_to_onnxruntime(tmp_path, tmp_path / "out", "int6")


def test_an_export_that_fails_says_so_without_a_traceback(tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=f"exporting {tiny_model_dir} to ONNX Runtime failed: (FileExistsError|"
                                        "NotADirectoryError)"):
        export_to_onnxruntime(tiny_model_dir, tmp_path / "file" / "onnx", "float32")

    def broken(*args, **kwargs):
        raise RuntimeError("Failed to export the model\nunsupported operator")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(UserError, match="failed: RuntimeError: unsupported operator$"):
        export_to_onnxruntime(tiny_model_dir, tmp_path / "onnx", "float32")


def test_float32_step_log_probabilities_match_pytorch(exported, tiny_model_dir, sources):
    """The decoder graph's candidates and log-sum-exp at the first step are PyTorch's logits' top entries."""
    model = load_model_dir(tiny_model_dir)
    translator = OnnxRuntimeTranslator(exported["float32"])
    encoder, decoder = translator.replicas[0]
    src = np.array([sources[0]], np.int64)
    cross = encoder.run(None, {"src": src})
    feeds = {"tokens": np.array([[model.cfg.decoder_start_id]]), "step": np.array([0]), "src": src,
             "candidates": np.array([4])}
    for i in range(model.cfg.decoder_layers):
        empty = np.zeros((1, model.cfg.heads, 0, model.cfg.head_dim), np.float32)
        feeds.update({f"past_k_{i}": empty, f"past_v_{i}": empty, f"cross_k_{i}": cross[2 * i],
                      f"cross_v_{i}": cross[2 * i + 1]})
    values, ids, log_sum_exp, *presents = decoder.run(None, feeds)
    with torch.no_grad():
        logits = model(torch.from_numpy(src), torch.tensor([[model.cfg.decoder_start_id]]))[0, -1]
    top = torch.topk(logits, 4)
    np.testing.assert_array_equal(ids[0], top.indices.numpy())
    np.testing.assert_allclose(values[0], top.values.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(log_sum_exp[0], torch.logsumexp(logits, -1).item(), rtol=1e-5)
    assert [p.shape for p in presents] == [(1, model.cfg.heads, 1, model.cfg.head_dim)] * 2 * model.cfg.decoder_layers
