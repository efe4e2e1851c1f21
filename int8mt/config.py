"""``tvm_config.yaml``: the defaults the CLI uses, validated section by section.

Every section is a dataclass; an unknown section or key, or a value of the wrong type, raises a
:class:`ConfigError` that names it. Relative paths are resolved against the config file's folder.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from .errors import UserError
from .model.config import ModelConfig
from .quant.config import QuantConfig
from .runtime.options import SearchOptions
from .runtime.translator import DEFAULT_BATCH_SIZE
from .targets import AUTO


class ConfigError(UserError):
    """An invalid configuration file or value."""


@dataclass(frozen=True)
class PathsConfig:
    model: Path = Path("model/ende")
    data: Path = Path("../shared/data/multi30k")
    build: Path = Path("build")
    runs: Path = Path("runs")


@dataclass(frozen=True)
class TrainConfig:
    src_lang: str = "en"
    tgt_lang: str = "de"
    epochs: int = 30
    batch_tokens: int = 3000
    lr: float = 1e-3
    warmup_steps: int = 400
    label_smoothing: float = 0.1
    patience: int = 4
    average_best: int = 3
    seed: int = 1
    bf16: bool = True
    max_tokens: int = 128

    def __post_init__(self) -> None:
        for name, least in (("epochs", 1), ("batch_tokens", 1), ("warmup_steps", 0), ("patience", 1),
                            ("average_best", 1), ("max_tokens", 2)):
            if getattr(self, name) < least:
                raise ConfigError(f"train.{name} must be at least {least}, got {getattr(self, name)}")
        if not 0 < self.lr < float("inf"):
            raise ConfigError(f"train.lr must be a number above 0, got {self.lr}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclass(frozen=True)
class DecodeConfig(SearchOptions):
    """The search options (their defaults are :class:`SearchOptions`'s) and the batch size."""

    batch_size: int = DEFAULT_BATCH_SIZE

    def search_options(self, **overrides: Any) -> SearchOptions:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(SearchOptions)}
        return SearchOptions(**{**fields, **{k: v for k, v in overrides.items() if v is not None}})


@dataclass(frozen=True)
class CompileConfig:
    """What ``int8mt compile`` builds by default; quantization defaults are :class:`QuantConfig`'s."""

    target: str = AUTO               # a preset name, or auto: the best preset this CPU runs
    quant: str = "int8"              # fp32 | int8 | int6
    ranges: str = QuantConfig.ranges
    runtime_attention: str = QuantConfig.runtime_attention
    calibration: str = QuantConfig.calibration
    percentile: float = QuantConfig.percentile
    calib_sentences: int = 512


@dataclass(frozen=True)
class TuneConfig:
    trials: int = 64                 # measured candidates per kernel
    budget_minutes: float = 30.0     # stop tuning after this long
    database: str = "shipped"        # shipped = the database in the package for the target; or a folder


@dataclass(frozen=True)
class Config:
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)


def _coerce(section: str, key: str, value: Any, kind: Any) -> Any:
    if kind is Path:
        if not isinstance(value, str):
            raise ConfigError(f"{section}.{key}: expected a path string, got {value!r}")
        return Path(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (int, float, str, bool) and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
        raise ConfigError(f"{section}.{key}: expected {kind.__name__}, got {value!r}")
    return value


def _section(name: str, cls: type, data: Any) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"section {name!r} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"unknown key {name}.{key}; known keys: {', '.join(sorted(known))}")
    values = {k: _coerce(name, k, v, hints[k]) for k, v in data.items()}
    try:
        return cls(**values)
    except ValueError as err:
        raise ConfigError(f"section {name!r}: {err}") from None


def load_config(path: Path | str | None) -> Config:
    """Read and validate ``path`` (defaults when None); relative paths become relative to its folder."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    sections = {f.name: f for f in dataclasses.fields(Config)}
    for key in data:
        if key not in sections:
            raise ConfigError(f"{path}: unknown section {key!r}; known sections: {', '.join(sections)}")
    hints = get_type_hints(Config)
    cfg = Config(**{name: _section(name, hints[name], data.get(name)) for name in sections})
    base = path.resolve().parent
    paths = PathsConfig(**{f.name: base / getattr(cfg.paths, f.name) for f in dataclasses.fields(PathsConfig)})
    return dataclasses.replace(cfg, paths=paths)
