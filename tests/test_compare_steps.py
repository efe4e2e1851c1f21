"""scripts/compare_steps.py: every bundle is timed in every round, in one process, and bad arguments and bundles
are refused by name."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_steps.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_times_every_bundle_in_every_round(tiny_bundle, tmp_path):
    out = tmp_path / "steps.json"
    done = _run(str(tiny_bundle), str(tiny_bundle), "--rounds", "3", "--steps", "2", "--position", "1", "--batch", "2",
                "--json", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["settings"]["batch"] == 2 and record["bundles"] == [str(tiny_bundle)] * 2
    assert [len(times) for times in record["step_us"]] == [3, 3]
    assert all(t > 0 for times in record["step_us"] for t in times)
    assert done.stdout.count(str(tiny_bundle)) == 2 and "median" in done.stdout


def test_refuses_bad_counts_and_a_missing_bundle(tiny_bundle, tmp_path):
    done = _run(str(tiny_bundle), "--rounds", "0")
    assert done.returncode == 2 and "--rounds must be at least 1" in done.stderr
    done = _run(str(tmp_path / "none"))
    assert done.returncode == 2 and "none does not exist" in done.stderr and "Traceback" not in done.stderr
