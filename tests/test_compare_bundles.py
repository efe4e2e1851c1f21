"""scripts/compare_bundles.py: every bundle runs every scenario in every round, each in a process of its own; the
same bundle twice gives the same outputs (equal digests), and bad scenarios and bundles are refused by name."""
import json
import subprocess
import sys
from pathlib import Path

import int8mt

from .conftest import DATA_DIR

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_bundles.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_runs_every_bundle_in_every_scenario_and_round(tiny_bundle, tmp_path):
    out = tmp_path / "runs.json"
    done = _run(str(tiny_bundle), str(tiny_bundle), "--rounds", "2", "--scenario", "1:2:4", "--scenario", "2:2:4",
                "--sources", str(DATA_DIR / "test_2016_flickr.en"), "--json", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    runs = json.loads(out.read_text())["runs"]
    assert len(runs) == 2 * 2 * 2 and all(r["sentences"] == 4 and r["sent_per_s"] > 0 for r in runs)
    for beam in (1, 2):
        assert len({r["digest"] for r in runs if r["beam"] == beam}) == 1  # one bundle: the same translations
    assert done.stdout.count(str(tiny_bundle)) == 4  # a line per bundle and scenario


def test_refuses_a_malformed_scenario_and_a_missing_bundle(tiny_bundle, tmp_path):
    done = _run(str(tiny_bundle), "--scenario", "4:32")
    assert done.returncode == 2 and "a scenario is beam:batch:sentences" in done.stderr
    done = _run(str(tmp_path / "none"), "--scenario", "1:1:1")
    assert done.returncode == 2 and "none does not exist" in done.stderr and "Traceback" not in done.stderr


def test_each_round_starts_one_bundle_later_and_a_revision_brings_its_own_runtime(tiny_bundle, tmp_path):
    """``PATH@REVISION`` runs with the runtime of that revision of this repository (here HEAD, whose runtime
    reads the bundle this checkout built: the same translations); the rounds alternate the order."""
    out = tmp_path / "runs.json"
    done = _run(f"{tiny_bundle}@HEAD", str(tiny_bundle), "--rounds", "2", "--scenario", "1:2:4",
                "--sources", str(DATA_DIR / "test_2016_flickr.en"), "--json", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    runs = json.loads(out.read_text())["runs"]
    assert [r["bundle"] for r in runs] == [f"{tiny_bundle}@HEAD", str(tiny_bundle), str(tiny_bundle),
                                           f"{tiny_bundle}@HEAD"]
    assert len({r["digest"] for r in runs}) == 1
    checkout = str(Path(int8mt.__file__).parent)
    assert [r["runtime"] == checkout for r in runs] == [False, True, True, False]  # (even with an editable install)
    assert all(Path(r["runtime"]).name == "int8mt" for r in runs)


def test_refuses_a_revision_that_is_not_one(tiny_bundle):
    done = _run(f"{tiny_bundle}@no-such-revision", "--scenario", "1:1:1",
                "--sources", str(DATA_DIR / "test_2016_flickr.en"))
    assert done.returncode == 2 and "cannot take the runtime of revision 'no-such-revision'" in done.stderr
    assert "Traceback" not in done.stderr
