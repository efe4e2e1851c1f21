"""What ``/translate`` accepts and what it refuses, with which status (no Ray needed)."""
import json
import re

import pytest

pytest.importorskip("ray.serve")

from int8mt.serving.server import RequestError, ServerSettings, parse_request  # noqa: E402

SETTINGS = ServerSettings(max_request_sentences=3, max_body_bytes=200)


@pytest.mark.parametrize("body, texts, overrides", [
    ({"text": "A dog."}, ["A dog."], {}),
    ({"text": ["A dog.", ""]}, ["A dog.", ""], {}),
    ({"text": [], "beam": 2}, [], {"beam_size": 2}),
    ({"text": ["x"], "beam": 4, "length_penalty": 1}, ["x"], {"beam_size": 4, "length_penalty": 1.0}),
])
def test_accepted(body, texts, overrides):
    assert parse_request(json.dumps(body).encode(), SETTINGS) == (texts, overrides)


@pytest.mark.parametrize("body, status, says", [
    (b"not json", 400, "not JSON"),
    (b"\xff\xfe", 400, "not UTF-8"),
    (b'["A dog."]', 400, "JSON object"),
    (b'{"texts": ["A dog."]}', 400, "unknown fields ['texts']"),
    (b'{"beam": 2}', 400, 'no "text"'),
    (b'{"text": 3}', 400, "string or a list of strings"),
    (b'{"text": ["a", 3]}', 400, "string or a list of strings"),
    (b'{"text": "a", "beam": "4"}', 400, '"beam" must be an integer'),
    (b'{"text": "a", "beam": true}', 400, '"beam" must be an integer'),
    (b'{"text": "a", "length_penalty": "x"}', 400, '"length_penalty" must be a number'),
    (b'{"text": ["a", "b", "c", "d"]}', 413, "4 texts"),
    (json.dumps({"text": "a" * 300}).encode(), 413, "at most 200"),
])
def test_refused(body, status, says):
    with pytest.raises(RequestError, match=re.escape(says)) as err:
        parse_request(body, SETTINGS)
    assert err.value.status == status


def test_settings_are_checked():
    with pytest.raises(ValueError, match="max-batch must be at least 1"):
        ServerSettings(max_batch=0)
    with pytest.raises(ValueError, match="batch-wait-ms"):
        ServerSettings(batch_wait_ms=float("nan"))
