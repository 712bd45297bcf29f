"""The machinery every spec is built from: documented fields, typing a YAML or command-line value into a field's
type, choices, the Spec base (from/to a dict, --help), and JSON stand-ins for in-memory data."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import field
from typing import Any

from .errors import NbalignError, unknown_option


def opt(default: Any, help: str, *, line: bool = True, factory=None):
    """A documented spec field. `line=False` keeps it out of the magic's line options (body only)."""
    meta = {"help": help, "line": line}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _base_type(tp) -> tuple[type | None, bool]:
    """(the simple type a field holds, whether None is allowed); (None, _) for anything richer."""
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if len(args) != 1:
            return None, optional
        tp = args[0]
    if typing.get_origin(tp) is typing.Literal:
        return str, optional
    return (tp if tp in (int, float, bool, str) else None), optional


# How a YAML body or a magic line writes a boolean.
BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def coerce(name: str, value: Any, tp, where: str, example: Any = None) -> Any:
    """Turn a YAML or command-line value into the field's type; PyYAML reads `2e-4` as a string."""
    base, optional = _base_type(tp)
    if value is None or base is None:
        return value
    if isinstance(value, str) and optional and value.strip().lower() in ("none", "null", "~"):
        return None
    try:
        if base is bool:
            if isinstance(value, str):
                if value.strip().lower() in BOOL_WORDS:
                    return BOOL_WORDS[value.strip().lower()]
                raise ValueError(value)
            return bool(value)
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if base is int and isinstance(value, str):
            return int(float(value)) if float(value).is_integer() else int(value)
        return base(value)
    except (TypeError, ValueError):
        raise NbalignError(
            f"{where}: '{name}' must be {'an' if base is int else 'a'} {base.__name__}, got {value!r}.",
            f"write e.g. `{name}: {_example(base, example)}`.",
        ) from None


def _example(base: type, example: Any = None) -> str:
    """A value of the right type to show in a fix: the field's own default when it has one."""
    if example is not None and isinstance(example, bool) == (base is bool):
        return str(example).lower() if base is bool else f"{example:g}" if base is float else str(example)
    return {int: "8", float: "2.0e-4", bool: "true", str: "text"}[base]


def choice(name: str, value: Any, choices: tuple, where: str) -> None:
    if value not in choices:
        shown = ", ".join(repr(c) for c in choices)
        raise NbalignError(f"{where}: '{name}' must be one of {shown}, got {value!r}.", f"pick one of {shown}.")


class Spec:
    """Shared behaviour of spec dataclasses: building from dicts, checking, JSON."""

    where: typing.ClassVar[str] = "nbalign"

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, values: dict | None, *, passthrough: bool = False):
        """Build a spec. Unknown keys are an error, or with `passthrough` are kept in `trl` for the method to
        check against its TRL config (which knows its own fields)."""
        values = dict(values or {})
        own = cls.field_names() - {"trl"}
        known, extra = {}, dict(values.pop("trl", None) or {})
        for key, value in values.items():
            key = str(key).replace("-", "_")
            (known if key in own else extra)[key] = value
        if extra and not passthrough:
            raise unknown_option(next(iter(extra)), own, cls.where)
        if extra:
            known["trl"] = extra
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in known and f.name != "trl":
                default = f.default if f.default is not dataclasses.MISSING else None
                known[f.name] = coerce(f.name, known[f.name], hints[f.name], cls.where, example=default)
        return cls(**known)

    def to_dict(self) -> dict:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Spec):
        return value.to_dict()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return describe_data(value)


def describe_data(data: Any) -> dict:
    """A JSON stand-in for in-memory data: its kind, size and a fingerprint, so a resumed run can tell
    whether it was given the same data."""
    kind = type(data).__name__
    rows = None
    try:
        rows = len(data)
    except TypeError:
        pass
    try:
        if hasattr(data, "to_json") and hasattr(data, "columns"):  # pandas
            blob = data.to_json(orient="records", default_handler=str)
        elif hasattr(data, "to_list") and hasattr(data, "column_names"):  # datasets.Dataset
            blob = json.dumps(data.to_list(), sort_keys=True, default=str)
        else:
            blob = json.dumps(data, sort_keys=True, default=str)
        fingerprint = hashlib.sha256(blob.encode()).hexdigest()[:16]
    except Exception:  # noqa: BLE001 - an unhashable object just has no fingerprint
        fingerprint = None
    described = {"in_memory": kind, "rows": rows, "fingerprint": fingerprint}
    if isinstance(getattr(data, "provenance", None), dict):  # rows made from a label store (labeling/store.py)
        described.update(labels=data.provenance, summary=data.summary)
    return described
