"""Schema errors as people read them: one line per problem, the key path, then what to write.

Shared by the deploy spec and experiment files: ``describe_error(err, root)`` takes the root
section of the file whose error it describes.
"""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Sequence
from typing import Any, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import ErrorDetails

_COMPARISONS = (
    ("greater than or equal to", ">="),
    ("less than or equal to", "<="),
    ("greater than", ">"),
    ("less than", "<"),
)
# Names people write for a valid value that spelling distance would not find.
_ALIASES = {"gpu": "cuda", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
_ALIASES |= {"fp32": "float32", "float": "float32", "disaggregate": "disaggregated"}


def did_you_mean(value: str, choices: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice (or known alias), else an empty string."""
    alias = _ALIASES.get(value.lower())
    close = [alias] if alias in choices else difflib.get_close_matches(value, list(choices), 1, 0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def describe_error(err: ErrorDetails, root: type[BaseModel]) -> str:
    """One pydantic error as ``key.path: what is wrong, what to write``, for a file whose schema
    is `root` (the deploy spec's DeploySpec, an experiment file's own)."""
    loc = tuple(err["loc"])
    path = ".".join(str(part) for part in loc) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{path}: unknown key{_key_hint(root, str(loc[-1]), loc[:-1])}"
    if kind == "missing":
        return f"{path}: missing; add it" + (" (e.g. name: my-model)" if loc == ("name",) else "")
    if kind in ("model_type", "model_attributes_type"):
        keys = ", ".join(_keys_at(root, loc))
        auto = "auto or " if getattr(_section_at(root, loc), "accepts_auto", False) else ""
        return f"{path}: must be {auto}a section with keys {keys}, got {short_repr(err['input'])}"
    return describe_value_error(path, err)


def describe_value_error(path: str, err: ErrorDetails) -> str:
    """A bad value at ``path`` (also used for experiment files): the validator's own message,
    or pydantic's rephrased (``must be >= 1, got 0``)."""
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] in ("value_error", "assertion_error"):
        return f"{path}: {msg}"
    value = err["input"]
    unquote = " (write it without quotes)" if isinstance(value, str) and _is_number(value) else ""
    for words, symbol in _COMPARISONS:
        msg = msg.replace(words, symbol)
    return f"{path}: {msg.replace('Input should', 'must', 1)}, got {short_repr(value)}{unquote}"


def short_repr(value: Any, limit: int = 80) -> str:
    """repr(value) cut to ``limit`` characters: an error never echoes a large input back."""
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring = 3, 6, 6, limit
    text = r.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _section_at(root: type[BaseModel], loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The schema section at a key path (list indices skipped; None if the path is not one)."""
    model = root
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        nested = section_type(field.annotation) if field is not None else None
        if nested is None:
            return None
        model = nested
    return model


def section_type(annotation: Any) -> type[BaseModel] | None:
    """The section class inside an annotation such as `X | None`, `list[X]` or `Annotated[...]`."""
    if get_origin(annotation) is None and isinstance(annotation, type):
        return annotation if issubclass(annotation, BaseModel) else None
    for arg in get_args(annotation):
        found = section_type(arg)
        if found is not None:
            return found
    return None


def _keys_at(root: type[BaseModel], loc: Sequence[str | int]) -> list[str]:
    section = _section_at(root, loc)
    return list(section.model_fields) if section is not None else []


def _key_hint(root: type[BaseModel], key: str, loc: Sequence[str | int]) -> str:
    """Closest valid key at `loc`, or the section the key belongs to, or the valid keys."""
    valid = _keys_at(root, loc)
    suggestion = did_you_mean(key, valid)
    if suggestion:
        return suggestion.replace(" (", "; ", 1).removesuffix(")")
    homes = [name for name in root.model_fields if key in _keys_at(root, (name,))]
    if homes:
        return f"; it belongs under {homes[0]}"
    return f"; valid keys here: {', '.join(valid)}"
