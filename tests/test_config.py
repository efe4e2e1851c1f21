from pathlib import Path

import pytest

from int8mt.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_config_is_valid():
    cfg = load_config(ROOT / "tvm_config.yaml")
    assert cfg.compile.target == "auto"
    assert cfg.paths.model == ROOT / "model" / "ende"


@pytest.mark.parametrize("text,message", [
    ("train:\n  epoch: 3\n", "unknown key train.epoch"),
    ("trian:\n  epochs: 3\n", "unknown section 'trian'"),
    ("train:\n  epochs: many\n", "train.epochs: expected int"),
    ("decode: 5\n", "section 'decode' must be a mapping"),
    ("model:\n  activation: tanh\n", "activation 'tanh' is not supported"),
    ("train: [1\n", "not valid YAML"),
    ("train:\n  epochs: 0\n", r"train.epochs must be at least 1, got 0"),
    ("train:\n  average_best: 0\n", r"train.average_best must be at least 1, got 0"),
    ("train:\n  lr: .nan\n", r"train.lr must be a number above 0, got nan"),
    ("train:\n  label_smoothing: 1.0\n", r"train.label_smoothing must be in \[0, 1\), got 1.0"),
])
def test_invalid_files_name_the_problem(tmp_path, text, message):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "none.yaml")


def test_relative_paths_resolve_against_the_file(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("paths:\n  model: m\n")
    assert load_config(path).paths.model == tmp_path / "m"
