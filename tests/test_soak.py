"""Soak: 4 threads send mixed requests (empty lines, long inputs, odd unicode, beams 1-8) to one shared
Translator for INT8MT_SOAK_MINUTES minutes (default 1); every output must equal a single-threaded run's and
the resident memory must stay flat after warm-up. Not in the default run:

    INT8MT_SOAK_MINUTES=10 python -m pytest -q -m soak
"""
import os
import random
import threading
import time

import pytest

from int8mt.runtime.options import SearchOptions
from int8mt.runtime.translator import Translator

REQUESTS = [
    [""], ["A dog runs."], ["", "Two men are talking.", ""], ["Ünïcödé — “quotes” 😀 and\u2028separators."],
    [" ".join(["word"] * 300)], [f"A child number {i} plays in the park." for i in range(12)],
]
BEAMS = range(1, 9)
RSS_GROWTH = 1.05  # allowed end / warm-up resident memory


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


@pytest.mark.soak
def test_shared_translator_under_mixed_load(tiny_bundle, capsys):
    minutes = float(os.environ.get("INT8MT_SOAK_MINUTES", "1"))
    translator = Translator(tiny_bundle)
    expected = {(i, beam): translator.translate(text, options=SearchOptions(beam_size=beam))
                for i, text in enumerate(REQUESTS) for beam in BEAMS}
    deadline = time.monotonic() + 60 * minutes
    warm = time.monotonic() + 60 * minutes / 5
    rss: dict[str, int] = {}
    counts, errors = [0] * 4, []

    def client(number: int) -> None:
        rng = random.Random(number)
        try:
            while time.monotonic() < deadline:
                i, beam = rng.randrange(len(REQUESTS)), rng.choice(BEAMS)
                got = translator.translate(REQUESTS[i], options=SearchOptions(beam_size=beam))
                if got != expected[(i, beam)]:
                    errors.append(f"request {i} at beam {beam}: {got!r} != {expected[(i, beam)]!r}")
                counts[number] += 1
                if number == 0 and "warm" not in rss and time.monotonic() >= warm:
                    rss["warm"] = _rss_bytes()
        except Exception as err:  # noqa: BLE001  (reported below)
            errors.append(repr(err))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rss["end"] = _rss_bytes()
    capsys.readouterr()  # the long inputs' truncation warnings
    with capsys.disabled():
        print(f"\nsoak: {sum(counts)} requests in {minutes} min, RSS after warm-up {rss['warm'] / 2**20:.1f} MiB, "
              f"at the end {rss['end'] / 2**20:.1f} MiB")
    assert not errors, errors[:5]
    assert rss["end"] <= RSS_GROWTH * rss["warm"]
