"""Typed job configs: pydantic models loaded from YAML with dotted ``key=value`` overrides.

Unknown keys, wrong types and impossible values fail before any work with a :class:`ConfigError`
whose message names the dotted key. The resolved config is saved next to every output.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from facesynth import storage

M = TypeVar("M", bound=BaseModel)
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class StrictModel(BaseModel):
    """Base for every config section: unknown keys and wrong types are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ConfigError(ValueError):
    """A config problem; the message names the dotted key."""


def find_config(name_or_path: str) -> Path:
    """A YAML path as given, or a preset name from ``configs/`` (``quickstart`` -> configs/quickstart.yaml)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    preset = CONFIG_DIR / f"{name_or_path}.yaml"
    if preset.exists():
        return preset
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config {name_or_path!r}: no such file, and not a preset (known presets: {known})")


def apply_override(data: dict, item: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML (``1``, ``true``, ``[1,2]``)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key=value (e.g. model.width=0.25)")
    parts = key.strip().split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def load_config(model: type[M], path: str | Path | None = None, overrides: list[str] = ()) -> M:
    """Load ``model`` from an optional YAML file plus dotted overrides; errors name the key."""
    data: dict = {}
    if path is not None:
        file = find_config(str(path))
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{file}: invalid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: expected a mapping at the top level, got {type(data).__name__}")
    for item in overrides:
        apply_override(data, item)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, model)) from None


def _describe(exc: ValidationError, model: type[BaseModel]) -> str:
    lines = [f"invalid {model.__name__} config:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        else:
            msg = err["msg"]
        given = err.get("input")
        shown = (
            ""
            if err["type"] in ("extra_forbidden", "missing") or isinstance(given, dict)
            else f" (got {given!r})"
        )
        lines.append(f"  {key}: {msg}{shown}")
    return "\n".join(lines)


def to_yaml(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def save_resolved(config: BaseModel, output_uri: str, name: str = "config.yaml") -> str:
    """Write the resolved config next to an output; returns its URI."""
    uri = storage.join(output_uri, name)
    storage.write_bytes(uri, to_yaml(config).encode())
    return uri


def parse_job_args(model: type[M], argv: list[str] | None, description: str, default: str | None = None) -> M:
    """Parse ``--config X.yaml key=value ...`` for a job; config errors exit with the message."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default, help="YAML file or preset name in configs/")
    parser.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, e.g. output=s3://bucket/run1"
    )
    args = parser.parse_args(argv)
    try:
        return load_config(model, args.config, args.overrides)
    except ConfigError as exc:
        parser.exit(2, f"error: {exc}\n")
