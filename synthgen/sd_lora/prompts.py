"""Prompt sets: people (a name plus attributes) x templates (an id plus text with ``{placeholders}``).

A template's placeholders are ``{name}`` and the keys of the people's ``attributes``; a placeholder that some
person lacks (or any other ``str.format`` field: positional ``{}``, ``{0}``, ``{a.b}``, conversions, format
specs) is a config error naming the template and the person. ``images_per_template`` images are generated per
person and template.

In the generate job, identity ``offset + i`` is person ``i``, and its sample ``s`` is image
``k = s % images_per_template`` of template ``s // images_per_template``:
``samples_per_identity = len(templates) * images_per_template``.

    images_per_template: 50
    people:
      - {name: Gerardo, attributes: {hair: curly black hair}}
    templates:
      - {id: named-hair, text: "a selfie of a young man named {name}, {hair}"}
"""

from __future__ import annotations

import string

import yaml
from pydantic import Field, ValidationError, model_validator

from facesynth.config import CONFIG_DIR, StrictModel, find_config

PROMPTS_DIR = CONFIG_DIR / "prompts"


def placeholders(text: str, what: str) -> list[str]:
    """The ``{field}`` names of ``text``; ValueError naming ``what`` for anything but plain named fields."""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ValueError(f"{what}: {text!r} is not a valid template ({exc})") from None
    names = []
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if not field.isidentifier() or spec or conversion:
            raise ValueError(
                f"{what}: placeholder {{{field}}} in {text!r}; expected plain {{name}}-style fields"
            )
        names.append(field)
    return names


def fill(text: str, values: dict[str, str], what: str) -> str:
    """``text`` with its placeholders filled from ``values`` (ValueError naming ``what`` for unknown ones)."""
    unknown = sorted(set(placeholders(text, what)) - set(values))
    if unknown:
        raise ValueError(
            f"{what}: unknown placeholder(s) {', '.join('{' + u + '}' for u in unknown)} in {text!r} "
            f"(known: {', '.join(sorted(values))})"
        )
    return text.format(**values)


class Person(StrictModel):
    """One identity of a prompt set: its name (``{name}``) and attributes (``{key}``)."""

    name: str = Field(min_length=1)
    attributes: dict[str, str] = Field(default_factory=dict)

    def values(self) -> dict[str, str]:
        return {**self.attributes, "name": self.name}


class Template(StrictModel):
    """One prompt style, with the id that names it in rows' ``params`` and the per-prompt tables."""

    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    text: str = Field(min_length=1)


class PromptSet(StrictModel):
    """People x templates, ``images_per_template`` images each."""

    images_per_template: int = Field(50, ge=1, description="images per person and template")
    people: list[Person] = Field(min_length=1)
    templates: list[Template] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> PromptSet:
        for key, values in (
            ("people", [p.name for p in self.people]),
            ("templates", [t.id for t in self.templates]),
        ):
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated:
                raise ValueError(f"{key}: repeated {repeated}")
        for t, template in enumerate(self.templates):
            for person in self.people:
                fill(template.text, person.values(), f"templates[{t}] (id {template.id!r}) for {person.name}")
        return self

    @property
    def samples_per_person(self) -> int:
        return len(self.templates) * self.images_per_template

    def row(self, person: int, sample: int) -> tuple[Person, Template, str]:
        """Person ``person``'s sample ``sample``: (person, template, prompt text)."""
        if not 0 <= person < len(self.people) or not 0 <= sample < self.samples_per_person:
            raise ValueError(
                f"person {person}, sample {sample}: outside {len(self.people)} people x "
                f"{self.samples_per_person} samples"
            )
        who, template = self.people[person], self.templates[sample // self.images_per_template]
        return who, template, template.text.format(**who.values())


def read_prompt_set(name_or_path: str) -> dict:
    """The raw mapping of a prompt-set file (validated by :class:`PromptSet` where it is used)."""
    path = find_config(name_or_path, PROMPTS_DIR, "prompt set")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"prompt set {path}: expected a mapping, got {type(data).__name__}")
    return data


def load_prompt_set(name_or_path: str) -> PromptSet:
    """A validated prompt set from a file; errors name the file and the offending key."""
    path = find_config(name_or_path, PROMPTS_DIR, "prompt set")
    try:
        return PromptSet.model_validate(read_prompt_set(str(path)))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in exc.errors()
        )
        raise ValueError(f"prompt set {path}: {problems}") from None
