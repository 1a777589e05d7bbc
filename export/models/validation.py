"""Strict, torch-free validation of family configs, declared as data.

Each family declares a :class:`Schema`: key -> :class:`Field` (type, bounds, official
default) plus a few cross-key rules. ``Schema.check`` runs before any module is built, so a
bad config fails in milliseconds with one line naming the key, instead of a torch error
deep in a constructor or, worse, an export whose shapes silently disagree with bundle.json.
Types are strict on purpose: JSON ``"false"`` is a string, and a string is truthy in Python.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from edgediff.runtime.errors import InvalidInput


class ConfigError(InvalidInput):
    """A family config that cannot describe a valid model (one line, names the key)."""


REQUIRED = object()   # a Field default meaning "the config must give this key"


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_list(v) -> bool:
    return isinstance(v, (list, tuple))


@dataclass(frozen=True)
class Field:
    """One key: ``kind`` is int, number, bool, str, ints (list of int), strs (list of str),
    size (int or [h, w]) or any; ``lo``/``hi`` bound numbers and list elements."""

    kind: str
    default: Any = REQUIRED
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False                 # lo itself excluded (positive floats)
    finite: bool = True                   # NaN is always refused; inf only when finite=False
    optional: bool = False                # null (None) accepted
    choices: tuple = ()                   # the only accepted values (checked instead of kind)
    nonempty: bool = False                # lists need at least one element
    words: str = ""                       # overrides the generated description

    def accepts(self, v) -> bool:
        if self.choices:
            return any(v is c or (v == c and type(v) is type(c)) for c in self.choices)
        if v is None:
            return self.optional
        if self.kind in ("ints", "strs"):
            elem = self._scalar_ok if self.kind == "ints" else (lambda e: isinstance(e, str))
            return _is_list(v) and (len(v) > 0 or not self.nonempty) and all(elem(e) for e in v)
        if self.kind == "size":
            return self._scalar_ok(v) or (_is_list(v) and len(v) == 2 and all(map(self._scalar_ok, v)))
        return self._scalar_ok(v)

    def _scalar_ok(self, v) -> bool:
        kind = "int" if self.kind in ("ints", "size") else self.kind
        if kind in ("bool", "str"):
            return isinstance(v, bool if kind == "bool" else str)
        if kind == "any":
            return True
        if not (_is_int(v) if kind == "int" else _is_number(v)) or math.isnan(v):
            return False
        if self.finite and math.isinf(v):
            return False
        low_ok = self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)
        return low_ok and (self.hi is None or v <= self.hi)

    def describe(self) -> str:
        """What the key must be, in words, for the error message."""
        if self.words:
            return self.words
        if self.choices:
            return "one of " + ", ".join(map(_show, self.choices))
        many = "a non-empty list" if self.nonempty else "a list"
        if self.kind in ("int", "number"):
            text = self._words("integer" if self.kind == "int" else "number")
        elif self.kind == "ints":
            text = f"{many} of {self._words('integers', plural=True)}"
        elif self.kind == "size":
            text = f"{self._words('integer')} or a [height, width] pair of them"
        else:
            text = {"bool": "true or false (a JSON boolean)", "str": "a string", "strs": f"{many} of strings",
                    "any": "anything"}[self.kind]
        return text + (" or null" if self.optional else "")

    def _words(self, noun: str, plural: bool = False) -> str:
        """e.g. 'a positive integer', 'non-negative integers', 'a finite number in [0, 1]'."""
        integer = noun.startswith("integer")
        positive = (self.lo == 0 and self.lo_open) or (integer and self.lo == 1 and not self.lo_open)
        adj, bounds = "", ""
        if self.hi is None and positive:
            adj = "positive"
        elif self.hi is None and self.lo == 0:
            adj = "non-negative"
        elif self.lo is not None and self.hi is not None:
            bounds = f" in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}]"
        elif self.lo is not None:
            bounds = f" {'>' if self.lo_open else '>='} {self.lo:g}"
        elif self.hi is not None:
            bounds = f" <= {self.hi:g}"
        if not integer and self.finite:
            adj = f"{adj} finite".strip()
        phrase = f"{adj} {noun}".strip() + bounds
        return phrase if plural else ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _show(v) -> str:
    """A value as the user wrote it (JSON-ish null), truncated to keep the error one line."""
    text = "null" if v is None else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def rule(test: Callable[[dict], bool], message: str) -> Callable[[dict], str | None]:
    """A cross-key rule: ``message`` (formatted with the config) when ``test(config)`` is false."""
    return lambda cfg: None if test(cfg) else message.format(**cfg)


@dataclass(frozen=True)
class Schema:
    """A family's keys (``fields``) and cross-key ``rules`` (cfg -> error text or None).

    ``unknown`` words the unknown-key error (``{keys}``, ``{allowed}``); ``metadata`` is a key
    prefix passed through unchecked (diffusers' ``_class_name``, ``_diffusers_version``)."""

    family: str
    fields: Mapping[str, Field]
    rules: tuple = ()
    unknown: str = "unknown key(s) {keys}; allowed: {allowed}"
    metadata: str | None = None

    def fail(self, message: str):
        raise ConfigError(f"{self.family} config: {message}")

    def defaults(self) -> dict:
        return {k: f.default for k, f in self.fields.items() if f.default is not REQUIRED}

    def check(self, config) -> dict:
        """``config`` -> a new dict with defaults filled in (metadata keys dropped), or ConfigError."""
        if not isinstance(config, Mapping):
            self.fail(f"must be a JSON object of keyword arguments, got {type(config).__name__}")
        given = {k: v for k, v in config.items() if not (self.metadata and str(k).startswith(self.metadata))}
        unknown = sorted(map(str, set(given) - set(self.fields)))
        if unknown:
            self.fail(self.unknown.format(keys=", ".join(unknown), allowed=", ".join(self.fields)))
        for key, field in self.fields.items():
            if key not in given and field.default is REQUIRED:
                self.fail(f"{key} is required ({field.describe()})")
        cfg = {**self.defaults(), **given}
        for key in given:
            field, value = self.fields[key], given[key]
            if not field.accepts(value):
                kind = "" if value is None else f" ({type(value).__name__})"
                self.fail(f"{key} must be {field.describe()}, got {_show(value)}{kind}")
        for check in self.rules:      # run only on well-typed values, so rules stay simple
            message = check(cfg)
            if message:
                self.fail(message)
        return cfg


# Shorthands for the common fields (the schema tables read as data).
def pos_int(default=REQUIRED, **kw) -> Field:
    return Field("int", default, lo=1, **kw)


def nonneg_int(default=REQUIRED, **kw) -> Field:
    return Field("int", default, lo=0, **kw)


def boolean(default=REQUIRED) -> Field:
    return Field("bool", default)


def pos_float(default=REQUIRED, **kw) -> Field:
    return Field("number", default, lo=0, lo_open=True, **kw)


def fraction(default=REQUIRED) -> Field:
    """A probability: a number in [0, 1]."""
    return Field("number", default, lo=0, hi=1)


def choice(default, *choices) -> Field:
    """Exactly one of ``choices`` (same type too: 1 is not True); None may be among them."""
    return Field("any", default, choices=tuple(choices))
