"""Tuning an ARM preset's kernels on a board through a TVM RPC tracker, end to end against an emulated aarch64
server on 127.0.0.1: ``int8mt tune --rpc`` cross-compiles the candidates here, checks and times them there and
records them in the database, which ``int8mt compile --db`` then applies. (Under emulation the times mean
nothing; the mechanism is what is tested.)"""
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from int8mt.cli import main as cli

from .emulation import needs_emulation, start_aarch64

pytestmark = [needs_emulation, pytest.mark.extended]  # ~1.5 min: outside the default run
KEY = "emulated-arm"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def tracker():
    """An RPC tracker on 127.0.0.1 (this machine) with an emulated aarch64 server registered under ``KEY``."""
    port = _free_port()
    tracker = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port",
                                str(port), "--port-end", str(port + 1)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    server = start_aarch64([str(Path(__file__).with_name("rpc_server.py")), "--tracker",
                                      f"127.0.0.1:{port}", "--key", KEY, "--port", str(_free_port())],
                               cpu="neoverse-n1")
    try:
        from tvm import rpc

        for _ in range(120):  # the emulated server takes a few seconds to start and register
            time.sleep(0.5)
            try:
                if KEY in rpc.connect_tracker("127.0.0.1", port).summary()["queue_info"]:
                    break
            except (OSError, RuntimeError):
                pass
        else:
            pytest.fail(f"the emulated RPC server did not register: {server.communicate(timeout=5)}")
        yield f"127.0.0.1:{port}"
    finally:
        server.kill()
        tracker.kill()


def test_tune_over_rpc_records_candidates_that_compile_applies(tracker, tiny_model_dir, tmp_path, capsys):
    """The model's kernels tuned on the board; a bundle built with the database then has every kernel tuned."""
    db, bundle = tmp_path / "db", tmp_path / "bundle"
    assert cli(["tune", str(tiny_model_dir), "--target", "arm-dotprod", "--rpc", f"{tracker}:{KEY}", "--trials", "1",
                "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "0 failed" in out, out
    log = json.loads((db / "tuning-log.json").read_text())[-1]
    assert log["measured_on"] == f"rpc {tracker}:{KEY}" and log["tasks"] and all(t["trials"] == 1 for t in log["tasks"])

    assert cli(["compile", str(tiny_model_dir), "--target", "arm-dotprod", "--quant", "int8", "--ranges", "runtime",
                "--db", str(db), "-o", str(bundle)]) == 0
    kernels = json.loads((bundle / "report.json").read_text())["kernels"]
    assert kernels and all(k["tuned"] for k in kernels)


def test_bench_kernels_over_rpc(tracker, capsys):
    assert cli(["bench", "kernels", "--target", "arm-dotprod", "--rpc", f"{tracker}:{KEY}", "--batch-sizes", "1"]) == 0
    out = capsys.readouterr().out
    assert f"measured on rpc {tracker}:{KEY}" in out
    assert out.count("| reference |") == 4 and out.count("| transformer-base |") == 4
    assert "int8mt FP32 GFLOPS" in out  # the float32 kernel of FP32 layers, timed on the board too


def test_rpc_errors_name_the_fix(tracker, tiny_model_dir, tmp_path, capsys):
    for rpc, message in [("localhost:9190", "expected HOST:PORT:KEY"),
                         (f"{tracker}:no-such-board", "no server with key 'no-such-board' is registered"),
                         (f"127.0.0.1:{_free_port()}:{KEY}", "no RPC tracker answers")]:
        assert cli(["tune", str(tiny_model_dir), "--target", "arm-dotprod", "--rpc", rpc, "--trials", "1",
                    "--db", str(tmp_path / "db")]) == 2
        assert message in capsys.readouterr().err
    assert cli(["tune", str(tiny_model_dir), "--target", "arm-dotprod", "--trials", "1"]) == 2
    assert "tune them on a board through a TVM RPC tracker, --rpc HOST:PORT:KEY" in capsys.readouterr().err
    assert cli(["bench", "kernels", "--target", "arm-i8mm"]) == 2
    assert "benchmark them on a board through a TVM RPC tracker" in capsys.readouterr().err
