"""How the declarative schemas explain themselves: error messages and documentation rows.

The schemas are pydantic v2 models: config.yaml (daemon/config.py) and the per-job settings
(engine/settings.py). pydantic is also what FastAPI, the web API's framework, validates with, so one
library describes every setting wherever it enters. Each field carries its type, range, default and help
text once; this module turns a :class:`pydantic.ValidationError` into the project's one-line wording
("must be a whole number (got 'x')", "must be >= 1 and <= 65535 (got 70000)") and a field into the
cells of the README's tables (daemon/readme.py).

Field options read here (``json_schema_extra``):

- ``expects``: what a value of the wrong type should have been ("a list of bare file names");
  derived from the annotation when absent.
- ``doc_type`` / ``doc_default``: the README's type and default cells, where the annotation or the
  default value alone would mislead (a default that comes from elsewhere, a path relative to another).

Torch-free; imported by the daemon.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.config import JsonDict
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

__all__ = [
    "SCHEMA_CONFIG",
    "SchemaProblem",
    "Loc",
    "problems",
    "fail",
    "doc",
    "show",
    "field_at",
    "bounds",
    "doc_type",
    "doc_default",
    "expects",
    "unwrap",
]

# Every schema model: no unknown keys, no type coercion ("3" is not a number, 1 is not true), no inf/nan,
# immutable once validated, and defaults run through the same validators as given values (paths resolve).
SCHEMA_CONFIG = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False, validate_default=True)

Loc = tuple[str | int, ...]

# Errors whose message is "must be <what the field expects>".
_TYPE_ERRORS = frozenset({
    "int_type", "int_parsing", "int_from_float", "float_type", "float_parsing", "bool_type", "bool_parsing",
    "string_type", "list_type", "tuple_type", "dict_type", "model_type", "model_attributes_type", "too_short",
    "too_long", "path_type", "none_required", "is_instance_of", "dataclass_type",
})
_RANGE_ERRORS = frozenset({"greater_than", "greater_than_equal", "less_than", "less_than_equal"})


class SchemaProblem(ValueError):
    """One validation problem: where (``loc``, field names and list indexes) and what (``message``)."""

    def __init__(self, loc: Loc, message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


def doc(**extra: str | bool) -> JsonDict:
    """A field's ``json_schema_extra``: ``expects``, ``doc_type``, ``doc_default`` (see above) and flags."""
    return dict(extra)


def fail(message: str, *, show_value: bool = True) -> PydanticCustomError:
    """The error a schema validator raises: its message is shown as written, then the offending value
    unless ``show_value`` is false (for messages that already quote the part that is wrong)."""
    return PydanticCustomError("schema" if show_value else "schema_plain", message)


def show(value: object, limit: int = 60) -> str:
    """``repr`` for messages: short, and safe for integers too long to print."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"a number of {len(str(abs(value))) if value.bit_length() < 10_000 else 'thousands of'} digits"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- walking a model along an error's location ------------------------------------------------


def unwrap(annotation: Any) -> Any:
    """Annotated[X, ...] -> X; X | None -> X."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _model(annotation: Any) -> type[BaseModel] | None:
    inner = unwrap(annotation)
    return inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None


def field_at(model: type[BaseModel], loc: Loc) -> tuple[type[BaseModel], FieldInfo | None]:
    """The innermost model on ``loc`` and the field ``loc`` ends in (None when it ends at a model)."""
    owner, field = model, None
    for part in loc:
        if isinstance(part, int):
            continue
        if field is not None:
            sub = _model(field.annotation)
            if sub is None:
                break  # a list item or a value inside a field: report against the field
            owner = sub
        field = owner.model_fields.get(part)
        if field is None:
            break
    return owner, field


# -- messages ------------------------------------------------------------------------------------


def _extra(field: FieldInfo | None, key: str) -> Any:
    extra = field.json_schema_extra if field is not None else None
    return extra.get(key) if isinstance(extra, dict) else None


def _num(x: object) -> str:
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:g}" if isinstance(x, float) else str(x)


def bounds(field: FieldInfo | None) -> str:
    """The field's range as ``>= 1 and <= 65535`` (empty when unbounded)."""
    parts = []
    for m in field.metadata if field is not None else ():
        if isinstance(m, annotated_types.Gt):
            parts.append(f"> {_num(m.gt)}")
        elif isinstance(m, annotated_types.Ge):
            parts.append(f">= {_num(m.ge)}")
        elif isinstance(m, annotated_types.Lt):
            parts.append(f"< {_num(m.lt)}")
        elif isinstance(m, annotated_types.Le):
            parts.append(f"<= {_num(m.le)}")
    return " and ".join(parts)


def _basic_expects(annotation: Any) -> str:
    inner = unwrap(annotation)
    origin = get_origin(inner)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(inner))
    if origin in (list, tuple):
        args = [a for a in get_args(inner) if a is not Ellipsis]
        return f"a list of {_plural(_basic_expects(args[0]))}" if args else "a list"
    if inner is bool:
        return "true or false"
    if inner is int:
        return "a whole number"
    if inner is float:
        return "a number"
    if inner is str:
        return "text"
    if inner is Path:
        return "a path"
    if _model(inner) is not None:
        return "a mapping of key: value lines"
    return "a valid value"


def _plural(what: str) -> str:
    return {"a whole number": "whole numbers", "a number": "numbers", "text": "texts", "a path": "paths"}.get(
        what, what)


def expects(field: FieldInfo | None) -> str:
    """What a value of this field must be, in words ("a whole number", "one of para, add")."""
    if field is None:
        return "a mapping of key: value lines"
    return str(_extra(field, "expects") or _basic_expects(field.annotation))


def _message(model: type[BaseModel], err: Any) -> str:
    kind, loc, value = err["type"], tuple(err["loc"]), err.get("input")
    owner, field = field_at(model, loc)
    got = f" (got {show(value)})"
    if kind == "schema":
        return str(err["msg"]) + got
    if kind == "schema_plain":
        return str(err["msg"])
    if kind == "extra_forbidden":
        noun = str(owner.model_config.get("title") or "key")
        return f"unknown {noun}; known {noun}s: " + ", ".join(owner.model_fields)
    if kind == "literal_error" or (kind in _TYPE_ERRORS and get_origin(unwrap(getattr(field, "annotation", None)))
                                   is Literal):
        return f"must be {expects(field)}" + got
    if kind in _RANGE_ERRORS or (kind == "float_type" and isinstance(value, int) and not isinstance(value, bool)):
        return f"must be {bounds(field) or 'a smaller number'}" + got  # an int too large for a float lands here
    if kind == "finite_number":
        return "must be a finite number" + got
    if kind == "string_too_long":
        return f"is longer than {err['ctx']['max_length']} characters"
    if kind == "string_too_short":
        return "must be a non-empty text" + got
    if kind in _TYPE_ERRORS or kind == "missing":
        if field is None and kind in ("model_type", "dict_type"):
            return "must be a mapping of key: value lines" + got
        return f"must be {expects(field)}" + got
    return str(err["msg"]) + got


def problems(model: type[BaseModel], exc: ValidationError) -> list[SchemaProblem]:
    """Each error of ``exc`` (raised validating ``model``) as a location and a one-line message."""
    return [SchemaProblem(tuple(e["loc"]), " ".join(_message(model, e).split())) for e in exc.errors()]


# -- documentation cells ----------------------------------------------------------------------------------


def _doc_range(field: FieldInfo) -> str:
    lo = hi = ""
    for m in field.metadata:
        if isinstance(m, annotated_types.Gt):
            lo = f"> {_num(m.gt)}"
        elif isinstance(m, annotated_types.Ge):
            lo = f"≥ {_num(m.ge)}"
        elif isinstance(m, annotated_types.Le):
            hi = f"≤ {_num(m.le)}"
        elif isinstance(m, annotated_types.Lt):
            hi = f"< {_num(m.lt)}"
        elif isinstance(m, annotated_types.MaxLen):
            hi = f"≤ {m.max_length} chars"
    if lo.startswith("≥") and hi and not hi.endswith("chars") and hi.startswith("≤"):
        return f"{lo[2:]}..{hi[2:]}"
    return ", ".join(x for x in (lo, hi) if x)


def doc_type(field: FieldInfo) -> str:
    """The README's "type [range]" cell."""
    given = _extra(field, "doc_type")
    if given:
        return str(given)
    inner = unwrap(field.annotation)
    if get_origin(inner) is Literal:
        return " \\| ".join(f"`{a}`" for a in get_args(inner))
    name = {bool: "bool", int: "int", float: "float", str: "text", Path: "path"}.get(inner)
    if name is None:
        name = expects(field).removeprefix("a ").removeprefix("an ")
    rng = _doc_range(field)
    return f"{name} [{rng}]" if rng else name


def doc_default(field: FieldInfo) -> str:
    """The README's default cell."""
    given = _extra(field, "doc_default")
    if given:
        return str(given)
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"`{value}`" if len(value) < 40 else f'"{value[:36]}…"'
    if isinstance(value, Path):
        return f"`{value if value.is_absolute() else './' + str(value)}`"
    if isinstance(value, float):
        return _num(value)
    return f"`{value}`" if isinstance(value, (list, tuple, dict)) else str(value)

