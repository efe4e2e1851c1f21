"""The command line: help, clear errors, and translation through a bundle."""
import subprocess
import sys

import pytest

from int8mt.cli import main

from .conftest import HOST_PRESET


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("train", "compile", "translate", "evaluate", "targets"):
        assert cmd in out


def test_targets_lists_each_preset_with_whether_it_runs_here_and_what_auto_picks(capsys):
    from int8mt.targets import PRESETS

    assert main(["targets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    heads = [line for line in lines if line and not line.startswith(" ")]
    assert [head.split()[0] for head in heads[:len(PRESETS)]] == list(PRESETS)
    assert heads[list(PRESETS).index(HOST_PRESET.name)].split(maxsplit=1) == [HOST_PRESET.name, "runs here"]
    assert any(line.strip() == 'TVM target {"kind": "llvm", "mcpu": "x86-64-v3"}' for line in lines)
    assert heads[-1] == f"auto (compile.target's default) picks {HOST_PRESET.name} here"


def test_unknown_target_is_a_clear_error(capsys, tiny_model_dir):
    assert main(["compile", str(tiny_model_dir), "--target", "riscv"]) == 2
    assert "unknown target preset 'riscv'" in capsys.readouterr().err


def test_missing_model_dir_is_a_clear_error(capsys, tmp_path):
    assert main(["compile", str(tmp_path), "-o", str(tmp_path / "b")]) == 2
    assert "config.json is missing" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["serve", "bench"])
@pytest.mark.parametrize("port", ["0", "65536", "99999", "http"])
def test_a_port_that_is_no_port_number_is_refused_before_anything_starts(command, port, tiny_bundle, capsys):
    with pytest.raises(SystemExit) as exited:
        main([command, str(tiny_bundle), "--port", port])
    assert exited.value.code == 2
    assert f"argument --port: must be a port number, 1-65535, got '{port}'" in capsys.readouterr().err


def test_translate_arguments_and_stdin(tiny_bundle):
    cmd = [sys.executable, "-m", "int8mt", "translate", str(tiny_bundle), "--beam", "2"]
    args = subprocess.run(cmd + ["A dog.", "A cat."], capture_output=True, text=True, check=True)
    assert len(args.stdout.splitlines()) == 2
    piped = subprocess.run(cmd, input="A dog.\nA cat.\n", capture_output=True, text=True, check=True)
    assert piped.stdout == args.stdout
    mixed = [sys.executable, "-m", "int8mt", "translate", str(tiny_bundle), "A dog.", "--beam", "2", "A cat."]
    assert subprocess.run(mixed, capture_output=True, text=True, check=True).stdout == args.stdout


def test_translate_without_a_bundle_is_a_clear_error(tmp_path):
    res = subprocess.run([sys.executable, "-m", "int8mt", "translate", str(tmp_path / "x"), "hi"],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert "does not exist" in res.stderr and "Traceback" not in res.stderr


def test_runtime_does_not_import_torch(tiny_bundle):
    code = ("import sys; from int8mt.runtime.translator import Translator; "
            f"Translator({str(tiny_bundle)!r}).translate(['A dog.']); print('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"
