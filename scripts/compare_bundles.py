"""Bundles against each other on one machine: each scenario run for every bundle in turn, each run in a fresh
process of the same runtime (``int8mt.interface.bench_engine``), for several rounds, so that a noisy machine's
drift falls on all of them alike. Prints sentences/s per round, peak RSS and a digest of the outputs (equal
digests: the same translations), and writes the runs as JSON.

    python scripts/compare_bundles.py build/ende build/ende-rt --rounds 3 --scenario 1:32:500 --scenario 4:32:300
    python scripts/compare_bundles.py build/opus-int8 build/opus-rt --fixed-tokens 32 --scenario 4:32:64

A scenario is ``beam:batch:sentences``; the sources are the first sentences of ``--sources`` (default the
test_2016_flickr English side under the data path of ./tvm_config.yaml), encoded with the first bundle's tokenizer.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from int8mt.config import load_config  # noqa: E402
from int8mt.errors import UserError  # noqa: E402
from int8mt.interface.bench_ctranslate2 import Layout, Scenario, _run, bundle_source_ids  # noqa: E402

LENGTH_PENALTY = 0.6


def _scenario(text: str) -> tuple[int, int, int]:
    try:
        beam, batch, sentences = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a scenario is beam:batch:sentences, such as 4:32:300, not {text!r}")
    if min(beam, batch, sentences) < 1:
        raise argparse.ArgumentTypeError(f"beam, batch and sentences must be positive in {text!r}")
    return beam, batch, sentences


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundles", type=Path, nargs="+")
    p.add_argument("--scenario", type=_scenario, action="append", required=True, help="beam:batch:sentences")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--fixed-tokens", type=int, default=None, help="every output exactly this many tokens")
    p.add_argument("--replicas", type=int, default=1, help="translators per process")
    p.add_argument("--threads", type=int, default=2, help="threads per translator")
    p.add_argument("--sources", type=Path, default=None, help="one sentence per line")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    try:
        runs = _compare(a)
    except (UserError, OSError) as err:  # a bundle that is not one, a missing source file: named, no traceback
        p.error(str(err))
    _report(a, runs)


def _compare(a: argparse.Namespace) -> list[dict]:
    """Every bundle in every scenario, round after round; a dict per run."""
    config = Path("tvm_config.yaml")
    sources = a.sources or Path(load_config(config if config.is_file() else None).paths.data) / "test_2016_flickr.en"
    sentences = sources.read_text(encoding="utf-8").splitlines()
    layout = Layout(a.replicas, a.threads)
    encoded = {count: bundle_source_ids(a.bundles[0], sentences[:count])[0] for _, _, count in a.scenario}
    runs = []
    for round_ in range(a.rounds):
        for beam, batch, count in a.scenario:
            ids = encoded[count]
            job = {"length_penalty": LENGTH_PENALTY, "fixed_tokens": a.fixed_tokens, "sources": ids,
                   "warmup": min(len(ids), 2 * batch), "device": "cpu"}
            for bundle in a.bundles:
                result = _run("int8mt", bundle.resolve(), layout, Scenario(beam, batch), job)
                runs.append({"round": round_, "bundle": str(bundle), "beam": beam, "batch": batch,
                             "sentences": len(ids), "sent_per_s": len(ids) / result["seconds"],
                             "peak_rss_mib": result["peak_rss_mib"],
                             "digest": hashlib.sha1(json.dumps(result["outputs"]).encode()).hexdigest()[:8]})
    return runs


def _report(a: argparse.Namespace, runs: list[dict]) -> None:
    """The runs as a table (sent/s per round, peak RSS, output digests), and as JSON with ``--json``."""
    layout = Layout(a.replicas, a.threads)
    print(f"{a.rounds} rounds, {layout.name}; beam:batch:sentences, sent/s per round | peak RSS MiB | outputs")
    for beam, batch, count in a.scenario:
        for bundle in a.bundles:
            mine = [r for r in runs if (r["bundle"], r["beam"], r["batch"]) == (str(bundle), beam, batch)]
            print(f"{beam}:{batch}:{mine[0]['sentences']:<6} {str(bundle):28s}",
                  " ".join(f"{r['sent_per_s']:8.1f}" for r in mine), "|",
                  " ".join(f"{r['peak_rss_mib']:.0f}" for r in mine), "|",
                  " ".join(sorted({r["digest"] for r in mine})))
    if a.json is not None:
        a.json.write_text(json.dumps({"layout": asdict(layout), "fixed_tokens": a.fixed_tokens, "runs": runs},
                                     indent=1))


if __name__ == "__main__":
    main()
