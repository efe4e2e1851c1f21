"""The comparison with CTranslate2: the same weights in both engines (our model exported to a Marian directory,
or an OPUS-MT-layout one, converted with CTranslate2's converter), the fixed-work protocol, and
``int8mt bench --against ctranslate2`` end to end on a tiny model."""
import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

ctranslate2 = pytest.importorskip("ctranslate2")
transformers = pytest.importorskip("transformers")

from int8mt.cli import main  # noqa: E402
from int8mt.data import pad_batch  # noqa: E402
from int8mt.errors import UserError  # noqa: E402
from int8mt.interface.bench_against import (GPU_COMPUTE_TYPES, Layout, Scenario, _run,  # noqa: E402
                                            format_comparison, is_intel_cpu, layouts)
from int8mt.interface.bench_engine import vocabularies  # noqa: E402
from int8mt.interface.ctranslate2_model import convert_to_ctranslate2  # noqa: E402
from int8mt.model.checkpoint import load_model_dir  # noqa: E402
from int8mt.model.converters.marian_export import export_marian  # noqa: E402
from int8mt.model.generate import greedy_decode  # noqa: E402
from int8mt.tokenizer import load_tokenizer  # noqa: E402

from .conftest import DATA_DIR, ROOT, as_cuda_sm90, edit_manifest  # noqa: E402
from .marian_dirs import build_marian_dir  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Recommended. pip install sacremoses")
SENTENCES = (DATA_DIR / "test_2016_flickr.en").read_text().splitlines()[:12]


MAX_TOKENS = 12


def _ctranslate2_greedy(ct2_dir, sources: list[list[int]]) -> list[list[int]]:
    source, target = vocabularies(ct2_dir)
    index = {token: i for i, token in enumerate(target)}
    translator = ctranslate2.Translator(str(ct2_dir), device="cpu", compute_type="float32")
    results = translator.translate_batch([[source[i] for i in ids] for ids in sources], beam_size=1,
                                         max_decoding_length=MAX_TOKENS)
    return [[index[t] for t in r.hypotheses[0]] for r in results]


def test_export_to_marian_round_trips_and_runs_in_transformers(tiny_model_dir, tmp_path):
    with warnings.catch_warnings(record=True) as seen:  # (no notice that transformers' text normalizer is missing)
        warnings.simplefilter("always")
        marian = export_marian(tiny_model_dir, tmp_path / "marian")
    assert not [w for w in seen if "sacremoses" in str(w.message)]
    ours, back = load_model_dir(tiny_model_dir), load_model_dir(marian)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), back.state_dict().values()))
    assert back.cfg.decoder_start_id == ours.cfg.decoder_start_id and back.cfg.eos_id == ours.cfg.eos_id
    tokenizer = load_tokenizer(tiny_model_dir)
    theirs = transformers.MarianTokenizer.from_pretrained(marian)
    assert [theirs(s).input_ids for s in SENTENCES] == [tokenizer.encode(s) for s in SENTENCES]
    hf = transformers.MarianMTModel.from_pretrained(marian).eval()
    src = torch.tensor([tokenizer.encode(SENTENCES[0])])
    tgt = torch.tensor([[ours.cfg.decoder_start_id, 17, 230, 41, 9]])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=src, decoder_input_ids=tgt).logits, ours(src, tgt),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("source", ["ours", "opus-mt"])
def test_ctranslate2_runs_the_same_model(source, tiny_model_dir, tmp_path):
    """Converted in FP32, CTranslate2's greedy translations equal our PyTorch model's: for our model (decoder
    started from <s>'s own embedding) and for an OPUS-MT-layout one (CTranslate2's own Marian loader)."""
    model_dir = tiny_model_dir if source == "ours" else build_marian_dir(tmp_path / "marian", "shared")
    ct2_dir = convert_to_ctranslate2(model_dir, tmp_path / "ct2", quantization="float32")
    model = load_model_dir(model_dir)
    sources = [load_tokenizer(model_dir).encode(s) for s in SENTENCES]
    expected = greedy_decode(model, torch.from_numpy(pad_batch(sources, model.cfg.pad_id)), MAX_TOKENS)
    assert _ctranslate2_greedy(ct2_dir, sources) == expected
    config = json.loads((ct2_dir / "config.json").read_text())
    assert config["decoder_start_token"] == ("<s>" if source == "ours" else "</s>")


def test_layouts_cover_one_translator_and_one_per_cpu():
    assert layouts("int8mt", 2, True) == [Layout(1, 2), Layout(2, 1)]
    assert layouts("ctranslate2", 2, True) == [Layout(1, 2, True), Layout(1, 2, False), Layout(2, 1, True),
                                               Layout(2, 1, False)]
    assert layouts("ctranslate2", 2, False) == [Layout(1, 2, False), Layout(2, 1, False)]
    assert layouts("int8mt", 1, False) == [Layout(1, 1)]


def test_on_a_gpu_each_engine_runs_one_translator_and_ctranslate2_each_int8_compute_type():
    assert layouts("int8mt", 2, True, GPU_COMPUTE_TYPES["int8"]) == [Layout(1, 1)]
    gpu = layouts("ctranslate2", 2, True, GPU_COMPUTE_TYPES["int8"])
    assert [layout.name for layout in gpu] == ["GPU, int8_float16", "GPU, int8_float32"]
    assert all(layout.mkl is None for layout in gpu)


def test_comparison_table_shows_gpu_memory_where_measured():
    def row(gpu_mib):
        engine = {"layout": "GPU, int8_float16", "sentences_per_second": 100.0, "peak_rss_mib": 900.0,
                  "gpu_memory_mib": gpu_mib}
        return {"scenario": "greedy, batch 32", "ratio": 1.0, "identical": 1.0, "ctranslate2": engine,
                "int8mt": {**engine, "gpu_memory_mib": None if gpu_mib is None else 2 * gpu_mib}}

    result = {"machine": "NVIDIA H100", "peer": "ctranslate2", "peer_version": "4.8.5", "compute_type": "int8",
              "bundle": "b", "sentences": 10, "fixed_tokens": None, "rows": [row(300.0)]}
    table = format_comparison(result)
    assert "GPU MiB after the run CTranslate2 / int8mt" in table and "| 900 / 900 | 300 / 600 |" in table
    assert "GPU MiB" not in format_comparison({**result, "rows": [row(None)]})


def test_bench_against_ctranslate2_fixed_work(tiny_model_dir, tiny_bundle, tmp_path, capsys):
    out, plot = tmp_path / "against.json", tmp_path / "against.png"
    assert main(["bench", str(tiny_bundle), "--against", "ctranslate2", "--model", str(tiny_model_dir),
                 "--fixed-tokens", "6", "--sentences", "10", "--batch-sizes", "4", "--beam", "2",
                 "--json", str(out), "--plot", str(plot)]) == 0
    table = capsys.readouterr().out
    assert "every sentence exactly 6 tokens" in table and "| beam 2, batch 4 |" in table
    assert "| scenario | CTranslate2 FP32 sent/s | int8mt FP32 sent/s |" in table  # (an FP32 bundle)
    result = json.loads(out.read_text())
    assert result["peer"] == "ctranslate2" and result["peer_version"] == ctranslate2.__version__
    assert [row["scenario"] for row in result["rows"]] == ["greedy, batch 4", "beam 2, batch 4"]
    cpus = len(os.sched_getaffinity(0))
    intel = is_intel_cpu()
    assert len(result["runs"]) == 2 * (len(layouts("int8mt", cpus, intel)) + len(layouts("ctranslate2", cpus, intel)))
    for row in result["rows"]:
        for engine in ("int8mt", "ctranslate2"):
            assert row[engine]["sentences_per_second"] > 0 and 20 < row[engine]["peak_rss_mib"] < 4000
    assert plot.stat().st_size > 10_000


def test_bench_against_refuses_another_models_bundle(tiny_bundle, capsys):
    assert main(["bench", str(tiny_bundle), "--against", "ctranslate2", "--model", str(ROOT / "model" / "ende"),
                 "--sentences", "2"]) == 2
    assert "was not compiled from" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU here would run the edited bundle")
def test_bench_against_refuses_a_cuda_bundle_without_a_gpu_before_converting(tiny_model_dir, bundle_copy, capsys):
    edit_manifest(bundle_copy, as_cuda_sm90)
    assert main(["bench", str(bundle_copy), "--against", "ctranslate2", "--model", str(tiny_model_dir),
                 "--sentences", "2"]) == 2
    err = capsys.readouterr().err
    assert "needs an NVIDIA GPU of compute capability 9.0 or newer; no CUDA GPU is visible" in err
    assert "converting" not in err


def test_an_engine_run_that_fails_says_why_without_a_traceback(bundle_copy):
    (bundle_copy / "model.so").write_bytes(b"\x7fELF not a library")  # (the engine's process checks the bundle)
    job = {"length_penalty": 0.6, "fixed_tokens": None, "sources": [[5, 6, 2]], "warmup": 0}
    with pytest.raises(UserError) as failed:
        _run("int8mt", bundle_copy, Layout(1, 1), Scenario(1, 1), job)
    assert str(failed.value).startswith("int8mt (1 x 1 threads, greedy, batch 1) failed:\n")
    assert "does not match the checksum in the manifest" in str(failed.value)
    assert "Traceback" not in str(failed.value)


def test_translate_command_loads_only_the_runtime_library(tiny_bundle):
    """A process that only translates imports TVM's runtime library, not the compiler."""
    code = ("import sys; from int8mt.cli import main; rc = main(['translate', sys.argv[1], 'A dog.']); "
            "maps = open('/proc/self/maps').read(); "
            "sys.exit(rc or ('libtvm_compiler' in maps) * 3 or ('libtvm_runtime' not in maps) * 4)")
    env = {k: v for k, v in os.environ.items() if k != "TVM_USE_RUNTIME_LIB"}
    done = subprocess.run([sys.executable, "-c", code, str(tiny_bundle)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_engine_process_imports_neither_tvm_nor_torch_for_ctranslate2():
    """CTranslate2's engine process holds only what CTranslate2 needs, so its peak memory is its own."""
    code = "import sys, int8mt.interface.bench_engine; print(sorted({'tvm', 'torch'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
