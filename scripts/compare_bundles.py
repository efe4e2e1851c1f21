"""Bundles against each other on one machine: each scenario run for every bundle in turn, each run in a fresh
process (``int8mt.interface.bench_engine``), for several rounds, each round starting one bundle later than the one
before (A B, B A, ...), so that a noisy machine's drift falls on all of them alike. Prints sentences/s per round,
peak RSS and a digest of the outputs (equal digests: the same translations), and writes the runs as JSON.

    python scripts/compare_bundles.py build/ende build/ende-rt --rounds 3 --scenario 1:32:500 --scenario 4:32:300
    python scripts/compare_bundles.py build/opus-int8 build/opus-rt --fixed-tokens 32 --scenario 4:32:64
    python scripts/compare_bundles.py /tmp/old@91fc180 build/ende --scenario 4:32:1000   # before/after a change

A bundle written ``PATH@REVISION`` runs with the runtime of that git revision of this repository (its packages
taken out with ``git archive`` into a temporary folder): a runtime change against the code before it, each with a
bundle compiled by its own code. A scenario is ``beam:batch:sentences``; the sources are the first sentences of
``--sources`` (default the test_2016_flickr English side under the data path of ./tvm_config.yaml), encoded with
the tokenizer of the first bundle that runs with this checkout's runtime.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from int8mt.config import load_config  # noqa: E402
from int8mt.errors import UserError  # noqa: E402
from int8mt.interface.bench_against import Layout, Scenario, _run, bundle_source_ids  # noqa: E402

LENGTH_PENALTY = 0.6
# the repository's folders -> where pyproject.toml installs them (int8mt first: the others go inside it)
PACKAGES = {folder: package.replace(".", "/") for package, folder in sorted(
    tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].items())}


@dataclass(frozen=True)
class Entry:
    """A bundle to run, with the runtime of ``revision`` (None: this checkout's)."""
    path: Path
    revision: str | None

    @property
    def name(self) -> str:
        return f"{self.path}@{self.revision}" if self.revision else str(self.path)


def _entry(text: str) -> Entry:
    path, at, revision = text.rpartition("@")
    if not at or Path(text).exists():
        return Entry(Path(text), None)
    return Entry(Path(path), revision)


def _runtime(revision: str, into: Path) -> Path:
    """The packages of git revision ``revision`` laid out as installed, under ``into``: the folder an engine process
    imports ``int8mt`` from (``_run``'s ``runtime``)."""
    done = subprocess.run(["git", "-C", str(ROOT), "archive", revision, *PACKAGES, ":(exclude)schedules/tuned"],
                          capture_output=True)
    if done.returncode:
        raise UserError(f"cannot take the runtime of revision {revision!r} out of {ROOT}: "
                        f"{done.stderr.decode(errors='replace').strip()}")
    site = into / revision.replace("/", "_")
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # (Python 3.11.4 and newer)
    with tarfile.open(fileobj=io.BytesIO(done.stdout)) as archive:
        archive.extractall(site / "checkout", **safe)
    for folder, package in PACKAGES.items():
        if (site / "checkout" / folder).is_dir():
            shutil.move(site / "checkout" / folder, site / package)
    return site


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
    p.add_argument("bundles", type=_entry, nargs="+", help="bundle folders, each PATH or PATH@REVISION")
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
    tokenizing = next((e for e in a.bundles if e.revision is None), a.bundles[-1]).path  # one this runtime reads
    encoded = {count: bundle_source_ids(tokenizing, sentences[:count])[0] for _, _, count in a.scenario}
    runs = []
    with tempfile.TemporaryDirectory(prefix="int8mt-runtimes-") as tmp:
        runtimes = {e.revision: str(_runtime(e.revision, Path(tmp))) for e in a.bundles if e.revision}
        for round_ in range(a.rounds):
            for beam, batch, count in a.scenario:
                ids = encoded[count]
                job = {"length_penalty": LENGTH_PENALTY, "fixed_tokens": a.fixed_tokens, "sources": ids,
                       "warmup": min(len(ids), 2 * batch), "device": "cpu"}
                turn = round_ % len(a.bundles)
                for entry in a.bundles[turn:] + a.bundles[:turn]:
                    result = _run("int8mt", entry.path.resolve(), layout, Scenario(beam, batch), job,
                                  runtimes.get(entry.revision))
                    runs.append(_record(round_, entry, beam, batch, ids, result))
    return runs


def _record(round_: int, entry: Entry, beam: int, batch: int, ids: list, result: dict) -> dict:
    return {"round": round_, "bundle": entry.name, "beam": beam, "batch": batch,
            "sentences": len(ids), "sent_per_s": len(ids) / result["seconds"], "peak_rss_mib": result["peak_rss_mib"],
            "digest": hashlib.sha1(json.dumps(result["outputs"]).encode()).hexdigest()[:8],
            "runtime": result.get("runtime")}  # (runtimes of older revisions do not say)


def _report(a: argparse.Namespace, runs: list[dict]) -> None:
    """The runs as a table (sent/s per round, peak RSS, output digests), and as JSON with ``--json``."""
    layout = Layout(a.replicas, a.threads)
    print(f"{a.rounds} rounds, {layout.name}; beam:batch:sentences, sent/s per round | peak RSS MiB | outputs")
    for beam, batch, count in a.scenario:
        for entry in a.bundles:
            mine = [r for r in runs if (r["bundle"], r["beam"], r["batch"]) == (entry.name, beam, batch)]
            print(f"{beam}:{batch}:{mine[0]['sentences']:<6} {entry.name:28s}",
                  " ".join(f"{r['sent_per_s']:8.1f}" for r in mine), "|",
                  " ".join(f"{r['peak_rss_mib']:.0f}" for r in mine), "|",
                  " ".join(sorted({r["digest"] for r in mine})))
    if a.json is not None:
        a.json.write_text(json.dumps({"layout": asdict(layout), "fixed_tokens": a.fixed_tokens, "runs": runs},
                                     indent=1))


if __name__ == "__main__":
    main()
