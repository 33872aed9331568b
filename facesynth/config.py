"""Typed job configs: pydantic models loaded from YAML with dotted ``key=value`` overrides.

Unknown keys, wrong types and impossible values fail before any work with a :class:`ConfigError`
whose message names the dotted key. ``true``/``false`` are not numbers: a bool given for an int or
float key is an error (pydantic's lax mode would read it as 1/0). The resolved config is saved next
to every output; ``--help`` of a job lists every key with its type, default and description.
"""

from __future__ import annotations

import argparse
import json
import os
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin
from urllib.parse import urlparse

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import to_jsonable_python

from facesynth import storage

M = TypeVar("M", bound=BaseModel)
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class BooleanNumber:
    """A YAML ``true``/``false`` found where an int or float is expected: no number validator accepts it."""

    def __init__(self, value: bool):
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


def _mark_bools(value: Any, annotation: Any) -> Any:
    """``value`` with each bool at a place ``annotation`` types as int or float (not bool) marked."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _mark_bools(value, args[0])
    if origin in (Union, types.UnionType):
        if bool in args:
            return value
        for member in args:
            marked = _mark_bools(value, member)
            if marked is not value:
                return marked
        return value
    if isinstance(value, bool):
        return BooleanNumber(value) if annotation in (int, float) else value
    if isinstance(value, dict) and origin in (dict, Mapping) and len(args) == 2:
        marked = {k: _mark_bools(v, args[1]) for k, v in value.items()}
        return marked if any(marked[k] is not v for k, v in value.items()) else value
    if isinstance(value, list | tuple) and args and origin in (list, tuple, set, frozenset, Sequence):
        kinds = args if origin is tuple and args[-1] is not Ellipsis else [args[0]] * len(value)
        marked = [_mark_bools(v, a) for v, a in zip(value, kinds)] + list(value[len(kinds) :])
        return marked if any(m is not v for m, v in zip(marked, value)) else value
    return value


class StrictModel(BaseModel):
    """Base for every config section: unknown keys, wrong types and bools for numbers are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_numbers(cls, data: Any) -> Any:
        """Mark bools given for int/float fields, so that the field's own validation rejects them."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: _mark_bools(v, fields[k].annotation) if k in fields else v for k, v in data.items()}


class ConfigError(ValueError):
    """A config problem; the message names the dotted key."""


def _output_uri(value: str) -> str:
    """Check an output location: a supported URI that is not the filesystem root (nor an empty string)."""
    loc = storage.parse(value)  # ValueError for "", "s3://" without a bucket and unsupported schemes
    parsed = urlparse(value)
    if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
        raise ValueError(
            f"{value!r}: a file URI needs an absolute path, file:///abs/path (not {parsed.netloc!r})"
        )
    if loc.scheme == "file" and os.path.dirname(loc.path) == loc.path:
        raise ValueError(f"{value!r} is the filesystem root: give a folder for the output")
    return value


OutputUri = Annotated[str, AfterValidator(_output_uri)]
"""An output URI (``s3://bucket[/prefix]``, ``file:///abs/path`` or a path), checked when the config loads."""


def find_config(name_or_path: str, folder: Path = CONFIG_DIR, what: str = "config") -> Path:
    """A YAML path as given, or a preset name from ``folder`` (``quickstart`` -> configs/quickstart.yaml)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    preset = folder / f"{name_or_path}.yaml"
    if preset.exists():
        return preset
    known = sorted(p.stem for p in folder.glob("*.yaml"))
    raise ConfigError(f"{what} {name_or_path!r}: no such file, and not a preset (known presets: {known})")


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
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc.problem})") from None


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
        elif isinstance(err.get("input"), BooleanNumber):
            msg = "expected a number, not a boolean"
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


def _type_name(annotation: Any) -> str:
    """``tuple[float, float]``, ``int | None``, ``'a' | 'b'`` (Literal) or a class name, without constraints."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0])
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]" if args else origin.__name__
    return "None" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def _section_types(annotation: Any) -> list[type[BaseModel]]:
    """The config sections (model classes) a field holds: one, or the members of a union of sections."""
    union = get_origin(annotation) in (Union, types.UnionType)
    members = get_args(annotation) if union else (annotation,)
    return [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]


def describe_keys(model: type[BaseModel], defaults: BaseModel | None = None, prefix: str = "") -> list[str]:
    """One line per dotted config key: type, default (or ``required``) and description.

    Sections are expanded, each member of a union of sections under its own heading; their defaults
    come from the enclosing default (``stage: StageConfig = StageConfig(batch_size=64)`` shows
    ``stage.batch_size`` with default 64).
    """
    lines = []
    for name, field in model.model_fields.items():
        key, sections = f"{prefix}{name}", _section_types(field.annotation)
        if defaults is not None:
            required, value = False, getattr(defaults, name)
        else:
            required = field.is_required()
            value = None if required else field.get_default(call_default_factory=True)
        if sections and (required or any(isinstance(value, s) for s in sections)):
            for section in sections:
                if len(sections) > 1:
                    lines.append(f"  {key} as {section.__name__}:")
                lines += describe_keys(section, value if isinstance(value, section) else None, f"{key}.")
            continue
        shown = "required" if required else f"default {json.dumps(to_jsonable_python(value))}"
        about = f": {field.description}" if field.description else ""
        lines.append(f"  {key} ({_type_name(field.annotation)}, {shown}){about}")
    return lines


def help_epilog(model: type[BaseModel], default: str | None = None) -> str:
    """The config keys of ``model`` and the default preset's YAML, for a job's ``--help``."""
    text = "config keys (override with key=value):\n" + "\n".join(describe_keys(model))
    if default is not None:
        preset = find_config(default)
        body = "\n".join(f"  {line}" for line in preset.read_text().strip().splitlines())
        text += f"\n\ndefault preset (without --config): {default} = {preset}\n{body}"
    return text


def parse_job_args(model: type[M], argv: list[str] | None, description: str, default: str | None = None) -> M:
    """Parse ``--config X.yaml key=value ...`` for a job; config errors exit (code 2) with the message."""
    parser = argparse.ArgumentParser(
        description=description,
        epilog=help_epilog(model, default),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", default=default, help=f"YAML file or preset name in configs/ (default: {default})"
    )
    parser.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, e.g. output=s3://bucket/run1"
    )
    args = parser.parse_args(argv)
    try:
        return load_config(model, args.config, args.overrides)
    except ConfigError as exc:
        parser.exit(2, f"error: {exc}\n")
