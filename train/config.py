"""Plain config objects: nested attribute containers with a fixed set of keys.

A config file is a Python file with `get_config() -> Config`. Command-line overrides
`--set optim.learning_rate=0.05` may only change keys that exist; the new value is parsed as a
Python literal and must match the type of the old one (an int may become a float, a list a
tuple, and any key whose default is None takes any literal).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config file, key or value that cannot be used."""


class TrainingError(RuntimeError):
    """A run that cannot go on (a non-finite loss); the message says what to do."""


class Config:
    """Attribute access over a fixed set of keys; nested Configs for groups.

    >>> c = Config(seed=0, optim=Config(learning_rate=0.1))
    >>> c.optim.learning_rate
    0.1
    >>> c.optim.lr = 1
    Traceback (most recent call last):
    ...
    train.config.ConfigError: unknown config key 'optim.lr' ...
    """

    def __init__(self, _path: str = "", **fields: Any):
        object.__setattr__(self, "_path", _path)
        object.__setattr__(self, "_fields", {})
        for key, value in fields.items():
            if isinstance(value, dict):
                value = Config(**value)
            if isinstance(value, Config):
                value = Config(_join(_path, key), **value.to_dict())
            self._fields[key] = value

    def __getattr__(self, key: str) -> Any:
        fields = object.__getattribute__(self, "_fields")
        if key in fields:
            return fields[key]
        raise AttributeError(_unknown(_join(self._path, key), fields))

    def __setattr__(self, key: str, value: Any) -> None:
        if key not in self._fields:
            raise ConfigError(_unknown(_join(self._path, key), self._fields))
        self._fields[key] = value

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=repr)

    def to_dict(self) -> dict[str, Any]:
        return {k: v.to_dict() if isinstance(v, Config) else v for k, v in self._fields.items()}

    def copy(self) -> Config:
        return Config(self._path, **self.to_dict())

    def get_path(self, dotted: str) -> Any:
        node, key = self._parent(dotted)
        return getattr(node, key)

    def set_path(self, dotted: str, value: Any) -> None:
        node, key = self._parent(dotted)
        if key not in node._fields:
            raise ConfigError(_unknown(dotted, node._fields))
        old = node._fields[key]
        if isinstance(old, Config):
            raise ConfigError(
                f"config key {dotted!r} is a group; set one of its keys instead: "
                f"{', '.join(f'{dotted}.{k}' for k in old)}"
            )
        node._fields[key] = _coerce(dotted, old, value)

    def _parent(self, dotted: str) -> tuple[Config, str]:
        *groups, key = dotted.split(".")
        node = self
        for i, g in enumerate(groups):
            child = node._fields.get(g)
            if not isinstance(child, Config):
                raise ConfigError(_unknown(".".join(groups[: i + 1]), node._fields))
            node = child
        return node, key


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _unknown(dotted: str, fields: dict[str, Any]) -> str:
    key = dotted.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(key, list(fields), n=1)
    hint = f"; did you mean {_join(dotted.rpartition('.')[0], close[0])!r}?" if close else ""
    return f"unknown config key {dotted!r}{hint} (known here: {', '.join(sorted(fields))})"


def _coerce(dotted: str, old: Any, value: Any) -> Any:
    if old is None or value is None:
        return value
    if isinstance(old, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(old, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(old, float):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif isinstance(old, tuple | list):
        if isinstance(value, tuple | list):
            return tuple(value) if isinstance(old, tuple) else list(value)
        if isinstance(value, int | float | str) and not isinstance(value, bool):
            return (value,) if isinstance(old, tuple) else [value]
    elif isinstance(old, str):
        if isinstance(value, str):
            return value
    else:
        return value
    kind = type(old).__name__
    article = "an" if kind[0] in "aeiou" else "a"
    raise ConfigError(
        f"config key {dotted!r} expects {article} {kind} (default {old!r}), got {value!r}"
    )


def parse_override(text: str) -> tuple[str, Any]:
    """'model.conv=dcn' -> ('model.conv', 'dcn'); values are Python literals, else strings."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"an override must look like key=value, got {text!r}")
    raw = raw.strip()
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = {"true": True, "false": False, "none": None}.get(raw.lower(), raw)
    return key.strip(), value


def apply_overrides(config: Config, overrides: Iterable[str]) -> Config:
    config = config.copy()
    for text in overrides:
        key, value = parse_override(text)
        config.set_path(key, value)
    return config


def configs_dir() -> Path:
    return Path(__file__).parent / "configs"


def load_config(path_or_name: str, overrides: Iterable[str] = ()) -> Config:
    """Loads `get_config()` from a file, or from train/configs/<name>.py given a bare name."""
    path = Path(path_or_name)
    if path.suffix != ".py" and not path.exists():
        path = configs_dir() / f"{path_or_name}.py"
    if not path.is_file():
        known = sorted(p.stem for p in configs_dir().glob("*.py") if not p.stem.startswith("_"))
        raise ConfigError(
            f"config file {str(path)!r} not found (bundled configs: {', '.join(known)})"
        )
    spec = importlib.util.spec_from_file_location(f"_train_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {str(path)!r} defines no get_config()")
    config = module.get_config()
    if not isinstance(config, Config):
        raise ConfigError(f"{path}: get_config() must return a train.config.Config")
    return apply_overrides(config, overrides)
