"""Tuning with MetaSchedule: records land in the JSON database with no failed candidate, a second run
resumes instead of starting over, and compilation picks the database's tiles."""
import json

import pytest
import tvm

from int8mt.cli import main
from int8mt.schedules.database import DenseTask, TileChooser, TuningDatabase, row_bucket
from int8mt.schedules.int8_dense import default_tiles

from ..conftest import VNNI, needs_vnni

TASKS = [DenseTask(64, 32, 32), DenseTask(128, 64, 640)]


def test_missing_database_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no tuning database in .*create one with `int8mt tune`"):
        TuningDatabase(tmp_path / "none")


def test_untuned_kernels_get_default_tiles(tmp_path):
    chooser = TileChooser(TuningDatabase(tmp_path, create=True))
    assert chooser(64, 32, "decode_step") == default_tiles(64, 32)
    assert list(chooser.kernels.values()) == [{"function": "decode_step", "n": 64, "k": 32, "rows_tuned_for": 32,
                                               "tiles": default_tiles(64, 32).to_dict(), "tuned": False}]


def test_row_buckets():
    assert [row_bucket(r) for r in (1, 20, 128, 200, 640, 5000)] == [32, 32, 32, 640, 640, 640]


@pytest.mark.slow
@needs_vnni
def test_tune_resume_and_apply(tmp_path):
    from int8mt.schedules.tune import tune

    target = tvm.target.Target(VNNI.target)
    database = TuningDatabase(tmp_path / "db", create=True)
    first = tune(TASKS, target, database, trials=8, trials_per_iter=8)
    assert [(r.trials_before, r.trials, r.build_failures, r.run_failures) for r in first] == [(0, 8, 0, 0)] * 2
    assert all(r.best_seconds > 0 for r in first)
    again = tune(TASKS, target, TuningDatabase(tmp_path / "db"), trials=12, trials_per_iter=4)
    assert [(r.trials_before, r.trials) for r in again] == [(8, 4), (8, 4)]
    database = TuningDatabase(tmp_path / "db")  # a database object reads the files when it is made
    assert len(database.records(TASKS[0])) == 12
    lines = (tmp_path / "db" / "database_tuning_record.json").read_text().splitlines()
    assert len(lines) == 24 and all(json.loads(line) for line in lines)
    chooser = TileChooser(TuningDatabase(tmp_path / "db"))
    tiles, _ = database.best(TASKS[1])
    assert chooser(128, 64, "encode") == tiles and chooser.kernels[(128, 64, "encode")]["tuned"]


def test_tune_and_bench_kernels_need_a_vnni_preset(capsys, tiny_model_dir):
    assert main(["tune", str(tiny_model_dir), "--target", "x86-avx2"]) == 2
    assert "preset x86-avx2 has no int8 dot-product kernels to tune" in capsys.readouterr().err
    assert main(["bench", "kernels", "--target", "x86-avx2"]) == 2
    assert "preset x86-avx2 has none" in capsys.readouterr().err


@needs_vnni
def test_bench_kernels_with_a_missing_database_is_a_clear_error(capsys, tmp_path):
    assert main(["bench", "kernels", "--target", "x86-vnni", "--db", str(tmp_path / "none")]) == 2
    assert "no tuning database in" in capsys.readouterr().err


def test_tuning_an_fp32_bundle_is_a_clear_error(capsys, tiny_bundle):
    assert main(["tune", str(tiny_bundle), "--target", "x86-vnni"]) == 2
    assert "has no int8 VNNI kernels to tune" in capsys.readouterr().err


@pytest.mark.slow
@needs_vnni
def test_tune_cli_on_a_model(capsys, tiny_model_dir, tmp_path):
    assert main(["tune", str(tiny_model_dir), "--target", "x86-vnni", "--trials", "4", "--db", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| 8000 x 32, 32 | 4 (had 0) | 0 | 0 |" in out and "28 trials, 0 failed (0.0 %)" in out
    log = json.loads((tmp_path / "tuning-log.json").read_text())
    assert len(log) == 1 and len(log[0]["tasks"]) == 7
