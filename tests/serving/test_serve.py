"""``int8mt serve`` on a local Ray (HTTP on 127.0.0.1): answers to concurrent requests equal the in-process runtime's,
bad requests get their status codes, health and the Python handle work."""
import json
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("ray.serve")

from int8mt.runtime.options import SearchOptions  # noqa: E402
from int8mt.runtime.translator import Translator  # noqa: E402
from int8mt.serving.cluster import WorkerLayout  # noqa: E402
from int8mt.serving.server import APP_NAME, ServerSettings, start  # noqa: E402
from tests.conftest import DATA_DIR  # noqa: E402

SENTENCES = (DATA_DIR / "test_2016_flickr.en").read_text(encoding="utf-8").splitlines()[:40]


@pytest.fixture(scope="module")
def server(ray_local, tiny_bundle):
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = ServerSettings(max_batch=8, batch_wait_ms=20, max_request_sentences=16)
    start(tiny_bundle, WorkerLayout(workers=2, threads=1), settings, "127.0.0.1", port)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def post(url: str, body: bytes, path: str = "/translate", method: str = "POST") -> tuple[int, dict]:
    request = urllib.request.Request(url + path, data=body if method == "POST" else None, method=method)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_concurrent_requests_equal_the_runtime_one_by_one(server, tiny_bundle):
    requests = [{"text": SENTENCES[i:i + 1 + i % 4], "beam": 1 + i % 3 * 2} for i in range(0, 36, 2)]
    requests.append({"text": ["", "A dog runs."]})  # default beam; an empty text gives an empty translation
    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(lambda r: post(server, json.dumps(r).encode()), requests))
    translator = Translator(tiny_bundle)
    for request, (status, answer) in zip(requests, answers):
        options = SearchOptions(beam_size=request.get("beam", translator.options.beam_size))
        assert status == 200
        assert answer["translations"] == [translator.translate([t], options=options)[0] for t in request["text"]]
    assert answers[-1][1]["translations"][0] == ""


@pytest.mark.parametrize("body, path, method, status, says", [
    (b"{", "/translate", "POST", 400, "not JSON"),
    (b'{"text": 1}', "/translate", "POST", 400, "string or a list"),
    (b'{"text": "a", "beam": 0}', "/translate", "POST", 400, "beam size must be at least 1"),
    (b'{"text": "a", "beam": 5000}', "/translate", "POST", 400, "exceeds the"),
    (b'{"text": "a", "length_penalty": -1}', "/translate", "POST", 400, "length_penalty"),
    (json.dumps({"text": ["a"] * 17}).encode(), "/translate", "POST", 413, "at most 16"),
    (json.dumps({"text": "word " * 100}).encode(), "/translate", "POST", 413, "the model reads at most 64"),
    (b"x" * (2 << 20), "/translate", "POST", 413, "accepts at most"),
    (b"", "/translate", "GET", 405, "takes POST"),
    (b"{}", "/nowhere", "POST", 404, "no route /nowhere"),
])
def test_bad_requests_get_their_status(server, body, path, method, status, says):
    code, answer = post(server, body, path, method)
    assert (code, says in answer["error"]) == (status, True), answer
    assert post(server, b'{"text": "A dog."}')[0] == 200  # and the server still serves


def test_health_and_python_handle(server, tiny_bundle):
    from ray import serve

    code, health = post(server, b"", "/health", "GET")
    assert code == 200 and health["status"] == "ready" and health["bundle"] == tiny_bundle.name
    handle = serve.get_app_handle(APP_NAME)
    expected = Translator(tiny_bundle).translate(SENTENCES[:3], options=SearchOptions(beam_size=2))
    assert handle.translate.remote(SENTENCES[:3], beam=2).result() == expected


def test_serve_command_serves_until_interrupted(tiny_bundle, tmp_path):
    """The command as a user runs it: its own local Ray, ready when /health answers, Ctrl-C stops it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    # Ctrl-C handled as at a terminal even where this test runs with SIGINT ignored (a background job of a
    # non-interactive shell), which the command would inherit
    log = tmp_path / "serve.err"  # (a file, not a pipe: Ray's logs would fill a pipe nobody reads while it starts)
    with open(log, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "int8mt", "serve", str(tiny_bundle), "--port", str(port),
                                    "--replicas", "1", "--beam", "2"], stderr=stderr, text=True,
                                   env={**os.environ, "RAY_ADDRESS": ""},
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if post(url, b"", "/health", "GET")[0] == 200:
                    break
            except (OSError, ValueError):  # not listening yet, or the proxy's plain-text 404 while deploying
                pass
            time.sleep(1)
        assert process.poll() is None, f"int8mt serve exited with {process.returncode}:\n{log.read_text()[-3000:]}"
        status, answer = post(url, json.dumps({"text": SENTENCES[:2]}).encode())
        assert status == 200
        expected = Translator(tiny_bundle).translate(SENTENCES[:2], options=SearchOptions(beam_size=2))
        assert answer["translations"] == expected  # the server's default beam is the command's --beam
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
    err = log.read_text()
    assert process.returncode == 130, err
    assert "int8mt serve: " in err and "interrupted" in err
