"""Bad input gets a clear error (exit code and a message naming the problem), and the runtime's guarantees
hold: one output line per input line, a warning instead of silent truncation, row bounds respected, one
Translator shared by threads."""
import io
import shutil
import subprocess
import sys
import threading

import pytest

from int8mt.cli import main
from int8mt.runtime.bundle import BUNDLE_FORMAT, Bundle, BundleError, sha256
from int8mt.runtime.options import SearchOptions
from int8mt.runtime.translator import Translator

from .conftest import edit_manifest

# (case, argv with {bundle}/{model}/{tmp} placeholders, expected exit code, fragment of stderr)
CASES = [
    ("missing bundle", ["translate", "{tmp}/none", "hi"], 2, "does not exist"),
    ("no QAT epoch", ["qat", "{model}", "--epochs", "0"], 2, "epochs must be a number above 0, got 0.0"),
    ("no training epoch", ["train", "--epochs", "0", "-o", "{tmp}/trained"], 2, "train.epochs must be at least 1"),
    ("bench with beam 0", ["bench", "{bundle}", "--beam", "0", "--no-pytorch"], 2, "beam size must be at least 1"),
    ("bench against CTranslate2 with beam 0", ["bench", "{bundle}", "--against", "ctranslate2", "--beam", "0"], 2,
     "beam size must be at least 1"),
    ("--against for bench kernels", ["bench", "kernels", "--against", "onnxruntime"], 2,
     "--against does not apply to `bench kernels`"),
    ("--fixed-tokens without --against", ["bench", "{bundle}", "--fixed-tokens", "5"], 2,
     "--fixed-tokens does not apply to `bench BUNDLE` (PyTorch): --fixed-tokens is for --against"),
    ("--serve with --against and --target", ["bench", "{bundle}", "--serve", "--against", "ctranslate2", "--target",
                                            "x86-vnni"], 2,
     "--against, --target do not apply to --serve: --target is for `bench kernels`"),
    ("quant table with beam 0", ["quant-table", "{model}", "--beam", "0"], 2, "beam size must be at least 1"),
    ("no tuning trial", ["tune", "{model}", "--target", "x86-vnni", "--trials", "0", "--db", "{tmp}/db"], 2,
     "--trials must be at least 1"),
    ("tuning database a file", ["tune", "{model}", "--target", "x86-vnni", "--db", "{tmp}/file"], 2,
     "/file is a file, not a folder; name the database's folder"),
    ("bundle is a file", ["inspect", "{tmp}/file"], 2, "file is a file, not a bundle directory"),
    ("model directory is a file", ["compile", "{tmp}/file"], 2, "/file is a file"),
    ("beam 0", ["translate", "{bundle}", "--beam", "0", "hi"], 2, "beam size must be at least 1"),
    ("beam above the row bound", ["translate", "{bundle}", "--beam", "2000", "hi"], 2, "exceeds the 1024 rows"),
    ("NaN length penalty", ["translate", "{bundle}", "--length-penalty", "nan", "hi"], 2,
     "length_penalty must be a finite number"),
    ("infinite length penalty", ["translate", "{bundle}", "--length-penalty", "inf", "hi"], 2,
     "length_penalty must be a finite number"),
    ("NaN max_length_a in the config", ["translate", "{bundle}", "--config", "{tmp}/nan.yaml", "hi"], 2,
     "max_length_a must be a finite number"),
    ("unknown config key", ["translate", "{bundle}", "--config", "{tmp}/unknown.yaml", "hi"], 2,
     "unknown key decode.beam"),
    ("unknown target", ["compile", "{model}", "--target", "riscv"], 2, "unknown target preset 'riscv'"),
    ("output is a file", ["compile", "{model}", "-o", "{tmp}/file"], 2, "is a file, not a folder"),
    ("output under a file", ["compile", "{model}", "-o", "{tmp}/file/bundle"], 2,
     "is not a folder this user can write into"),
    ("quantization flags with fp32", ["compile", "{model}", "--quant", "fp32", "--ranges", "runtime"], 2,
     "need --quant int8 or --quant int6"),
    ("--runtime-attention with static ranges", ["compile", "{model}", "--ranges", "calibrate",
                                                "--runtime-attention", "int8"], 2, "--runtime-attention is for --ranges runtime"),
    ("CUDA graphs for a CPU", ["compile", "{model}", "--target", "x86-avx2", "--cuda-graphs"], 2,
     "--cuda-graphs replays GPU kernels; x86-avx2 runs on the CPU"),
    ("missing input file", ["translate", "{bundle}", "-i", "{tmp}/none.txt"], 2, "none.txt does not exist"),
    ("sentences and --input", ["translate", "{bundle}", "-i", "{tmp}/in.txt", "hi"], 2, "not both"),
    ("output would overwrite the input", ["translate", "{bundle}", "-i", "{tmp}/in.txt", "-o", "{tmp}/in.txt"], 2,
     "would overwrite the input"),
    ("folder input without an output folder", ["translate", "{bundle}", "-i", "{tmp}/folder"], 2,
     "give an output folder"),
    ("folder input, output a file", ["translate", "{bundle}", "-i", "{tmp}/folder", "-o", "{tmp}/file"], 2,
     "must be a folder"),
    ("zero workers", ["translate", "{bundle}", "-i", "{tmp}/in.txt", "--workers", "0"], 2,
     "replicas must be at least 1"),
    ("zero threads", ["translate", "{bundle}", "--threads", "0", "hi"], 2, "threads per replica must be at least 1"),
    ("--against with an incomplete Marian config", ["bench", "{bundle}", "--against", "ctranslate2", "--model",
                                                    "{tmp}/marian-bad", "--sentences", "2"], 2,
     "marian-bad/config.json lacks 'vocab_size', which a MarianConfig has"),
    ("--ray without --output", ["translate", "{bundle}", "-i", "{tmp}/in.txt", "--ray"], 2, "name the output file"),
    ("Ray address where nothing listens", ["serve", "{bundle}", "--address", "127.0.0.1:9"], 2,
     "no Ray cluster answers at 127.0.0.1:9"),
    ("malformed Ray address", ["translate", "{bundle}", "-i", "{tmp}/in.txt", "-o", "{tmp}/out.txt", "--ray",
                               "headnode"], 2, "is not HOST:PORT"),
    ("--ray without --input", ["translate", "{bundle}", "--ray", "local", "hi"], 2, "--ray translates files"),
    ("input file not UTF-8", ["translate", "{bundle}", "-i", "{tmp}/latin1.txt"], 2, "latin1.txt is not UTF-8 text"),
    ("config not UTF-8", ["translate", "{bundle}", "--config", "{tmp}/latin1.txt", "hi"], 2,
     "latin1.txt is not UTF-8 text"),
    ("corrupt report", ["inspect", "{tmp}/bundle-bad-report"], 2, "report.json is corrupt"),
]


@pytest.mark.parametrize("case,argv,code,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error(case, argv, code, message, tiny_bundle, tiny_model_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "nan.yaml").write_text("decode:\n  max_length_a: .nan\n")
    (tmp_path / "unknown.yaml").write_text("decode:\n  beam: 4\n")
    (tmp_path / "latin1.txt").write_bytes("Café au lait.\n".encode("latin-1"))
    (tmp_path / "in.txt").write_text("A dog.\n")
    (tmp_path / "folder").mkdir()
    (tmp_path / "marian-bad").mkdir()
    (tmp_path / "marian-bad" / "config.json").write_text('{"model_type": "marian"}')
    for name in ("model.safetensors", "source.spm", "target.spm", "vocab.json"):
        (tmp_path / "marian-bad" / name).write_text("")
    (tmp_path / "folder" / "a.en").write_text("A dog.\n")
    shutil.copytree(tiny_bundle, tmp_path / "bundle-bad-report")
    (tmp_path / "bundle-bad-report" / "report.json").write_text("{half")
    args = [a.format(bundle=tiny_bundle, model=tiny_model_dir, tmp=tmp_path) for a in argv]
    assert main(args) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_one_output_line_per_input_line(tiny_bundle, monkeypatch, capsys):
    """Form feeds, vertical tabs, U+2028 and the like do not split a line; CRLF endings are one line each."""
    text = "One dog.\nA form\x0cfeed.\nA\x0bvertical\u2028tab.\r\n\nLast.\n"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(text.encode("utf-8")), encoding="utf-8"))
    assert main(["translate", str(tiny_bundle), "--beam", "1"]) == 0
    assert len(capsys.readouterr().out.split("\n")) == 5 + 1  # five lines, each ended by a newline


def test_long_input_is_translated_in_part_with_a_warning(tiny_bundle, capsys):
    translator = Translator(tiny_bundle, SearchOptions(beam_size=1))
    long = " ".join(["word"] * (2 * translator.bundle.max_positions))
    assert len(translator.translate(["A dog.", long])) == 2
    err = capsys.readouterr().err
    assert "warning: input 2 has" in err and f"only its first {translator.bundle.max_positions - 1}" in err


def test_rows_beyond_the_bound_are_split_into_several_calls(tiny_bundle, monkeypatch):
    sentences = [f"A dog number {i} runs." for i in range(9)]
    whole = Translator(tiny_bundle, SearchOptions(beam_size=2)).translate(sentences)
    bounded = Translator(tiny_bundle, SearchOptions(beam_size=2))
    monkeypatch.setattr(bounded.bundle, "max_rows", 4)
    calls = []
    encode = bounded.bundle.encode
    monkeypatch.setattr(bounded.bundle, "encode", lambda src: calls.append(len(src)) or encode(src))
    assert bounded.sentences_per_call() == 2 and bounded.translate(sentences) == whole
    assert max(calls) == 2 and sum(calls) == 9


def test_threads_share_one_translator(tiny_bundle):
    sentences = [f"Two dogs play in the snow {i}." for i in range(16)]
    shared = Translator(tiny_bundle, SearchOptions(beam_size=2), batch_size=4)
    expected = shared.translate(sentences)
    results, errors = {}, []

    def work(t: int) -> None:
        try:
            for r in range(3):
                results[(t, r)] = shared.translate(sentences[t::2] if t % 2 else sentences)
        except Exception as err:  # noqa: BLE001  (reported below)
            errors.append(err)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for (t, _), got in results.items():
        assert got == (expected[t::2] if t % 2 else expected)


def _translate_cli(bundle, stdin=None, args=(), shell_suffix="") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "int8mt", "translate", str(bundle), *args]
    if shell_suffix:
        return subprocess.run(["bash", "-c", " ".join(f"'{c}'" for c in cmd) + shell_suffix], capture_output=True)
    return subprocess.run(cmd, input=stdin, capture_output=True)


@pytest.mark.parametrize("kind", ["stdin", "argv", "closed stdin"])
def test_text_that_is_not_utf8_or_absent_is_a_clear_error(tiny_bundle, kind):
    if kind == "stdin":
        res, message = _translate_cli(tiny_bundle, stdin=b"A dog\xff\xfe.\n"), b"standard input is not UTF-8 text"
    elif kind == "argv":
        res = subprocess.run([sys.executable.encode(), b"-m", b"int8mt", b"translate", str(tiny_bundle).encode(),
                              b"A \xff dog."], capture_output=True)
        message = b"sentence argument 1 is not valid UTF-8 text"
    else:
        res, message = _translate_cli(tiny_bundle, shell_suffix=" <&-"), b"no text to translate"
    assert res.returncode == 2 and message in res.stderr and b"Traceback" not in res.stderr


def _rechecksum(bundle) -> None:
    edit_manifest(bundle, lambda m: m["files"].update({"model.so": sha256(bundle / "model.so")}))


@pytest.mark.parametrize("field,value,message", [
    ("files", "model.so", "'files' must be a dict"),
    ("target", "x86-avx2", "'target' must be a dict"),
    ("model", "tiny", "'model' must be a dict"),
    ("top_candidates", "16", "'top_candidates' must be a int"),
    ("entry_points", [1, 2], "'entry_points' must hold str values"),
    ("max_rows", True, "'max_rows' must be a int"),
    ("weights", [], "'weights' must be a dict"),
    ("format", BUNDLE_FORMAT - 1,
     f"bundle format {BUNDLE_FORMAT - 1} is not supported .this runtime reads {BUNDLE_FORMAT}.; rebuild it"),
    ("format", BUNDLE_FORMAT + 1, f"bundle format {BUNDLE_FORMAT + 1} is not supported"),
    ("model", {"vocab_size": 8000}, "decoder_layers, heads, d_model, ffn_dim, max_positions"),
])
def test_wrong_typed_manifest_fields(bundle_copy, field, value, message):
    edit_manifest(bundle_copy, lambda m: m.update({field: value}))
    with pytest.raises(BundleError, match=message):
        Bundle(bundle_copy)


@pytest.mark.parametrize("edit,message", [
    (lambda w: w["tensors"][0].update(offset=w["tensors"][0]["offset"] + 1), "places a weight at bytes"),
    (lambda w: w["tensors"][-1].update(shape=[1 << 30]), "places a weight at bytes"),
    (lambda w: w["entry_points"]["encode"].append(len(w["tensors"])), "names weights it does not list"),
    (lambda w: w["entry_points"]["encode"].append(-1), "names weights it does not list"),
    (lambda w: w["entry_points"]["greedy_decode"].pop(), "gives greedy_decode other weights than decode_step"),
    (lambda w: w["tensors"][0].update(dtype="no such type"), "which TVM does not know"),
    (lambda w: w["tensors"][0].pop("dtype"), "has no 'dtype'"),
])
def test_weights_the_manifest_misplaces_are_a_clear_error(bundle_copy, edit, message):
    """Checked before any weight is mapped: read past the file's end, a view would crash with SIGBUS."""
    edit_manifest(bundle_copy, lambda m: edit(m["weights"]))
    with pytest.raises(BundleError, match=message):
        Bundle(bundle_copy)


def test_a_target_vocabulary_size_that_is_not_an_integer_is_a_clear_error(bundle_copy):
    edit_manifest(bundle_copy, lambda m: m["model"].update({"target_vocab_size": "8000"}))
    with pytest.raises(BundleError, match="target_vocab_size must be integers"):
        Bundle(bundle_copy)


def test_manifest_required_features_are_checked(bundle_copy):
    edit_manifest(bundle_copy, lambda m: m["target"].update({"required_features": ["sse2", "imaginary_isa"]}))
    with pytest.raises(BundleError, match=r"lacks \(imaginary_isa\)"):
        Bundle(bundle_copy)


@pytest.mark.parametrize("damage,message", [
    (lambda data: data[: len(data) // 2], "is truncated"),
    (lambda data: b"not a shared library at all" * 100, "is not a 64-bit little-endian ELF"),
    (lambda data: data[:18] + (183).to_bytes(2, "little") + data[20:], "is code for aarch64"),
])
def test_damaged_or_foreign_library_with_a_matching_checksum(bundle_copy, damage, message):
    """Checked before the library is opened: mapped, a truncated one would crash with SIGBUS."""
    (bundle_copy / "model.so").write_bytes(damage((bundle_copy / "model.so").read_bytes()))
    _rechecksum(bundle_copy)
    with pytest.raises(BundleError, match=message):
        Bundle(bundle_copy)


def test_recompiling_replaces_a_bundle_whole_and_never_a_foreign_folder(tiny_model_dir, tiny_bundle, tmp_path,
                                                                        monkeypatch):
    from int8mt.compiler import build
    from int8mt.targets import get_preset

    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "compile_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build.build_bundle(tiny_model_dir, get_preset("auto"), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old bundle, untouched
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"...")
    assert main(["compile", str(tiny_model_dir), "--quant", "fp32", "-o", str(foreign)]) == 2


def test_tuning_database_damage_is_named_and_a_torn_last_line_repaired(tmp_path, capsys):
    from int8mt.schedules.database import DATABASE_FILES, DenseTask, TuningDatabase, shipped_database

    shutil.copytree(shipped_database("x86-avx2"), tmp_path / "db")
    records = tmp_path / "db" / DATABASE_FILES[1]
    intact = records.read_bytes()
    records.write_bytes(intact + b'[0, [["a", 1')  # a killed run's half-written record
    database = TuningDatabase(tmp_path / "db")
    assert "line" in capsys.readouterr().err and records.read_bytes() == intact
    assert database.best(DenseTask(256, 256, 32, "avx2")) is not None
    lines = intact.split(b"\n")
    records.write_bytes(b"\n".join(lines[:3] + [b"{broken"] + lines[3:]))
    with pytest.raises(ValueError, match=f"{records}: line 4 is not valid JSON"):
        TuningDatabase(tmp_path / "db")
    records.write_bytes(intact)
    (tmp_path / "db" / "confirmed.json").write_text("{half")
    with pytest.raises(ValueError, match="confirmed.json is corrupt"):
        TuningDatabase(tmp_path / "db").best(DenseTask(256, 256, 32, "avx2"))


def test_ctrl_c_during_tuning_says_what_was_kept_and_exits_130(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """MetaSchedule hands a Ctrl-C inside its search back as a RuntimeError; the command still exits 130."""
    from int8mt.interface import tune as tune_interface
    from int8mt.schedules import tune as schedules_tune
    from int8mt.schedules.database import DenseTask

    def interrupted(*_args, **_kwargs):
        raise RuntimeError("Traceback (most recent call last): ... KeyboardInterrupt")

    monkeypatch.setattr(schedules_tune, "tune", interrupted)
    monkeypatch.setattr(tune_interface, "dense_tasks",
                        lambda source, preset, *_: [DenseTask(64, 32, 32, preset.int8_dot)])
    assert main(["tune", str(tiny_model_dir), "--db", str(tmp_path / "db"), "--trials", "2"]) == 130
    err = capsys.readouterr().err
    assert "keeps every candidate measured so far" in err and "Traceback" not in err


def test_translated_lines_are_written_before_a_later_failure(tiny_bundle, tmp_path, monkeypatch, capsys):
    """Output streams block by block: a failure in a later block does not lose the lines already translated."""
    from int8mt.cli import translate as translate_cli

    monkeypatch.setattr(translate_cli, "STREAM_LINES", 2)
    calls = []
    real = Translator.translate

    def failing_third_block(self, sentences, *args, **kwargs):
        calls.append(len(sentences))
        if len(calls) == 3:
            raise RuntimeError("the device went away")
        return real(self, sentences, *args, **kwargs)

    monkeypatch.setattr(Translator, "translate", failing_third_block)
    (tmp_path / "in.txt").write_text("".join(f"Line {i}.\n" for i in range(6)))
    with pytest.raises(RuntimeError, match="the device went away"):
        main(["translate", str(tiny_bundle), "-i", str(tmp_path / "in.txt"), "--beam", "1"])
    assert len(capsys.readouterr().out.splitlines()) == 4


def test_a_bug_keeps_its_traceback_and_a_user_error_does_not(tiny_bundle, monkeypatch, capsys):
    """Only UserError (bad files, flags, configuration, bundles) becomes a one-line message and exit 2; an
    unexpected ValueError from inside int8mt is a bug and propagates with its traceback."""
    from int8mt.errors import UserError

    for error, raised in ((UserError("bad flag"), False), (ValueError("internal invariant"), True)):
        def fail(self, *args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(Translator, "translate", fail)
        if raised:
            with pytest.raises(ValueError, match="internal invariant"):
                main(["translate", str(tiny_bundle), "hi"])
        else:
            assert main(["translate", str(tiny_bundle), "hi"]) == 2
            assert "error: bad flag" in capsys.readouterr().err
