"""``int8mt bench BUNDLE --serve`` runs end to end on a local Ray and writes its table, JSON and plot."""
import json
import socket

import pytest

pytest.importorskip("ray.serve")
pytest.importorskip("matplotlib")

from int8mt.cli import main  # noqa: E402
from tests.conftest import DATA_DIR  # noqa: E402


def test_load_benchmark_writes_table_json_and_plot(ray_local, tiny_bundle, tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "config.yaml"
    config.write_text(f"paths:\n  data: {DATA_DIR}\n")
    assert main(["bench", str(tiny_bundle), "--serve", "--config", str(config), "--sentences", "16",
                 "--clients", "1,3", "--request-sentences", "1,2", "--beam", "2", "--port", str(port),
                 "--json", str(tmp_path / "load.json"), "--plot", str(tmp_path / "load.png")]) == 0
    result = json.loads((tmp_path / "load.json").read_text())
    assert [(r["clients"], r["request_sentences"]) for r in result["rows"]] == [(1, 1), (3, 1), (1, 2), (3, 2)]
    assert all(r["sentences_per_second"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0 for r in result["rows"])
    assert result["beam"] == 2 and result["in_process_sentences_per_second"]["before"] > 0
    assert (tmp_path / "load.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 3 | 2 |" in capsys.readouterr().out
