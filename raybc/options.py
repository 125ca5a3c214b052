"""The base of every options class, and loading options from YAML files and flags.

Each component keeps its options class next to it (``StorageOptions`` in ``storage``,
``BackfillOptions`` in ``backfill``); job configs in ``config`` nest them. All of them derive
from :class:`Options`: unknown fields are refused, values are checked on assignment, and
:func:`load_options` turns pydantic's error list into one :class:`~raybc.errors.ConfigError`
that names every bad field, its value's problem and the file it came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from raybc.errors import ConfigError

T = TypeVar("T", bound="Options")


class Options(BaseModel):
    """Strict options: unknown fields are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def _field_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


def describe_validation_error(err: ValidationError) -> list[str]:
    """One line per problem: the dotted field path, what is wrong, and what to do."""
    problems = []
    for e in err.errors():
        path = _field_path(e["loc"])
        if e["type"] == "extra_forbidden":
            problems.append(f"{path}: unknown field; remove it or check its spelling")
        elif e["type"] == "missing":
            problems.append(f"{path}: required field is missing; set it in the config file or as a flag")
        else:
            shown = repr(e.get("input"))
            if len(shown) > 60:
                shown = shown[:57] + "..."
            msg = e["msg"]
            if "secret" in path.lower() or "key" in path.lower() or "token" in path.lower():
                shown = "'**********'"  # never echo a credential back
            problems.append(f"{path}: {msg} (got {shown})")
    return problems


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file; an error names the file when it is not one."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError([f"cannot read config file: {exc.strerror or exc}"], source=str(p)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], source=str(p)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"top level must be a mapping of option names, got {type(data).__name__}"], source=str(p))
    return data


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``; nested mappings merge, other values replace."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_options(cls: type[T], *, file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Build ``cls`` from a YAML file (optional) with ``overrides`` (from flags) on top.

    Raises ConfigError listing every problem, each naming its field and the source.
    """
    data: dict[str, Any] = read_yaml(file) if file is not None else {}
    if overrides:
        data = deep_merge(data, overrides)
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        source = str(file) if file is not None else "command-line flags"
        if file is not None and overrides:
            source = f"{file} (with command-line flags)"
        raise ConfigError(describe_validation_error(err), source=source) from None


def validate_options(cls: type[T], data: dict[str, Any], *, source: str) -> T:
    """Like :func:`load_options` for a mapping that came from elsewhere (a manifest, an API call)."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err), source=source) from None
