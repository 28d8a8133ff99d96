"""Typed dataclasses read from YAML, with one-line errors that name the field: value
coercion against the annotations, numeric bounds, a YAML loader that refuses duplicate keys
and reports line numbers, and dotted `--set` paths. `cast_mlx.config` declares the recipe
with it."""

from __future__ import annotations

import dataclasses
import re
import reprlib
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Literal

import yaml

from cast_mlx.errors import ConfigError


class ShortRepr(reprlib.Repr):
    """Bounded reprs for messages: YAML aliases can nest a value exponentially, and Python
    refuses to print an integer of more than 4300 digits."""

    def __init__(self):
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother = 3, 60, 60

    def repr_int(self, x, level):
        if x.bit_length() > 10_000:  # about 3000 digits: printing more may raise
            return f"<an integer of {x.bit_length()} bits>"
        return super().repr_int(x, level)  # shortened to maxlong characters


short_repr = ShortRepr()


def show(value) -> str:
    """`value` for an error message: a short repr, on one line."""
    return short_repr.repr(value)


def key_name(key) -> str:
    """A mapping key for a field path: as it is when printable, else its short repr."""
    return key if isinstance(key, str) and key.isprintable() and key else show(key)


def bounds(default, *, ge=None, gt=None, le=None, lt=None):
    """A numeric field with a default and an allowed range."""
    return field(default=default, metadata={"ge": ge, "gt": gt, "le": le, "lt": lt})


def type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        return f"{origin.__name__} of {', '.join(type_name(a) for a in typing.get_args(tp))}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


# Exponent floats without a dot ("4e-4", "1E-3"): YAML 1.1, which PyYAML implements, reads
# them as strings. They are accepted for float fields, so `lr: 4e-4` and `--set lr=4e-4` work.
YAML11_FLOAT = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def coerce(value, tp, where: str):
    """Check `value` against annotation `tp`; return it in canonical form or raise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, where)
            except ConfigError:
                if len(args) == 2 and type(None) in args:  # Optional[X]: X's own message
                    raise
        raise ConfigError(f"{where}: expected {type_name(tp)}, got {show(value)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool):
            choices = ", ".join(str(a) for a in allowed)
            raise ConfigError(f"{where}: {show(value)} is not allowed; choose one of: {choices}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} numbers, got {show(value)}")
        return tuple(coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        (arg,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {show(value)}")
        return [coerce(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {show(value)}")
        if not -(2**63) <= value < 2**63:  # counts end up in MLX/numpy int64 arrays
            raise ConfigError(f"{where}: {show(value)} is too large (the limit is 2**63 - 1)")
        return value
    if tp is float:
        if isinstance(value, str) and YAML11_FLOAT.match(value):
            value = float(value)  # YAML 1.1 reads 4e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {show(value)}")
        number = float(value) if not isinstance(value, int) or value.bit_length() <= 1023 else float("inf")
        if number != number or number in (float("inf"), float("-inf")):
            raise ConfigError(f"{where}: expected a finite number, got {show(value)}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {show(value)}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover - schema bug


def check_bounds(value, f: dataclasses.Field, where: str) -> None:
    m = f.metadata
    if value is None or not m or isinstance(value, str):  # a word a numeric field allows (`auto`)
        return
    for key, ok, word in (
        ("ge", lambda v, b: v >= b, ">="),
        ("gt", lambda v, b: v > b, ">"),
        ("le", lambda v, b: v <= b, "<="),
        ("lt", lambda v, b: v < b, "<"),
    ):
        b = m.get(key)
        if b is not None and not ok(value, b):
            raise ConfigError(f"{where}: must be {word} {b}, got {show(value)}")


def build(cls, data, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'recipe'}: expected a mapping of keys, got {show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            where = f"{prefix}.{key_name(key)}" if prefix else key_name(key)
            raise ConfigError(f"{where}: unknown key; allowed: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        where = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, data[name] if data[name] is not None else {}, where)
        else:
            value = coerce(data[name], tp, where)
            check_bounds(value, f, where)
            kwargs[name] = value
    return cls(**kwargs)


def set_path(root, data: dict, dotted: str, value) -> None:
    """Set `data[a][b] = value` for `dotted` = `a.b`, after checking that the path names a
    field (not a section) of the dataclass tree under `root`."""
    keys = dotted.split(".")
    node = data
    cls: typing.Any = root  # a section's dataclass
    for i, key in enumerate(keys):
        names = {f.name: f for f in dataclasses.fields(cls)}
        where = ".".join(keys[: i + 1])
        if key not in names:
            raise ConfigError(f"--set {dotted}: unknown key {where!r}; allowed: {', '.join(names)}")
        tp = typing.get_type_hints(cls)[key]
        if i == len(keys) - 1:
            if dataclasses.is_dataclass(tp):
                raise ConfigError(f"--set {dotted}: {where} is a section; set one of its keys")
            node[key] = value
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"--set {dotted}: {where} is not a section")
        node = node.setdefault(key, {}) if isinstance(node.get(key, {}), dict) else {}
        cls = tp


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader (plain data only: no tags that build objects) that also refuses
    a key given twice in one mapping, which PyYAML would silently resolve to the last."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable: the base class reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {show(key)}", key_node.start_mark)
        return super().construct_mapping(node, deep)


class YAMLProblem(Exception):
    """Why a text is not usable YAML: `problem` (one line) and the 1-based `line`, if known."""

    def __init__(self, problem: str, line: int | None = None):
        super().__init__(problem)
        self.problem, self.line = problem, line


def parse_yaml(text: str):
    """The data of a YAML text; every way it can fail becomes a YAMLProblem."""
    try:
        return yaml.load(text, Loader=RecipeLoader)  # a SafeLoader: builds plain data only
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        problem = ", ".join(part for part in (exc.context, exc.problem) if part) or "unreadable"
        raise YAMLProblem(" ".join(problem.split()), mark.line + 1 if mark else None) from exc
    except yaml.YAMLError as exc:  # a ReaderError (control characters) has no mark
        raise YAMLProblem(str(exc).splitlines()[0]) from exc
    except RecursionError:
        raise YAMLProblem("nested too deeply") from None
    except ValueError as exc:  # a scalar PyYAML cannot convert: 2001-13-14, a 5000-digit number
        raise YAMLProblem(str(exc).split(";")[0][:100]) from exc


def read_yaml(path: str | Path) -> dict:
    """The raw mapping of a recipe file (empty file: {}); ConfigError naming the file if it is
    missing, unreadable, not UTF-8, not YAML, or not a mapping."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a recipe file")
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the recipe ({exc.strerror or exc})") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 at line {line} (byte 0x{raw[exc.start]:02x})") from None
    try:
        data = parse_yaml(text)
    except YAMLProblem as exc:
        at = f" at line {exc.line}" if exc.line else ""
        raise ConfigError(f"{path}: malformed YAML{at}: {exc.problem}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping, got {type(data).__name__}")
    return data
