"""Bad input gets a clear error (exit code and a message naming the problem), and the runtime's guarantees
hold: one output line per input line, a warning instead of silent truncation, row bounds respected, one
Translator shared by threads."""
import io
import threading

import pytest

from int8mt.cli import main
from int8mt.runtime.search import SearchOptions
from int8mt.runtime.translator import Translator

# (case, argv with {bundle}/{model}/{tmp} placeholders, expected exit code, fragment of stderr)
CASES = [
    ("missing bundle", ["translate", "{tmp}/none", "hi"], 2, "does not exist"),
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
    ("unreadable input file", ["translate", "{bundle}", "-i", "{tmp}/none.txt"], 2, "cannot read"),
]


@pytest.mark.parametrize("case,argv,code,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error(case, argv, code, message, tiny_bundle, tiny_model_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "nan.yaml").write_text("decode:\n  max_length_a: .nan\n")
    (tmp_path / "unknown.yaml").write_text("decode:\n  beam: 4\n")
    args = [a.format(bundle=tiny_bundle, model=tiny_model_dir, tmp=tmp_path) for a in argv]
    assert main(args) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_one_output_line_per_input_line(tiny_bundle, monkeypatch, capsys):
    """Form feeds, vertical tabs, U+2028 and the like do not split a line; CRLF endings are one line each."""
    monkeypatch.setattr("sys.stdin", io.StringIO("One dog.\nA form\x0cfeed.\nA\x0bvertical\u2028tab.\r\n\nLast.\n"))
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
    assert bounded.sentences_per_call == 2 and bounded.translate(sentences) == whole
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
