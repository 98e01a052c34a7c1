"""One declaration per option: its type, its range, its help text.

Every user-settable value (model config fields, training options, data options, and the
command-line flags of each command) is a dataclass field declared with ``option(...)``.
The same declaration

* builds the command-line flag and its help (``add_arguments``),
* checks a value from a config file, a flag or the Python API (``check``), and
* checks a whole section of a config file, unknown keys included (``check_section``),

so a new option cannot skip validation and every bad value gets one line naming the
option (or the file and field) and the problem. Cross-field checks (which combinations
make sense) live next to the dataclass that owns the fields.

This module imports nothing from the rest of the package but its errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import os
import types
import typing
from dataclasses import dataclass, field

from .errors import ConfigError


@dataclass(frozen=True)
class Spec:
    """What a value of an option may be. Bounds are inclusive (``above`` is exclusive)."""

    help: str
    flag: str | None = None          # the command-line flag, if the option has one
    min: float | None = None
    max: float | None = None
    above: float | None = None
    choices: tuple | None = None
    length: int | None = None         # how many entries a list option must have
    metavar: str | None = None
    env: str | None = None            # an environment variable that sets it when the flag is not given


def option(default, help: str, **spec) -> dataclasses.Field:
    """A dataclass field carrying its ``Spec`` (defaults are immutable: None, numbers, texts,
    tuples)."""
    return field(default=default, metadata={"spec": Spec(help, **spec)})


def specs(cls) -> list[tuple[str, object, Spec, object]]:
    """(name, type, spec, default) of every declared field of the dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("spec")
        if spec is not None:
            out.append((f.name, hints[f.name], spec, f.default))
    return out


def _kinds(typ) -> tuple[set, bool]:
    """({'int', 'float', 'str', 'bool', 'ints', 'floats'}, None allowed) of an annotation."""
    args = typing.get_args(typ) if typing.get_origin(typ) in (typing.Union, types.UnionType) else (typ,)
    kinds, optional = set(), False
    for a in args:
        if a is type(None):
            optional = True
        elif a is bool:
            kinds.add("bool")
        elif a is int:
            kinds.add("int")
        elif a is float:
            kinds.add("float")
        elif a is str:
            kinds.add("str")
        elif typing.get_origin(a) is tuple:
            kinds.add("ints" if typing.get_args(a)[0] is int else "floats")
        else:  # pragma: no cover - a declaration error, not a user error
            raise TypeError(f"unsupported option type {a!r}")
    return kinds, optional


def describe(typ, spec: Spec, cli: bool = False) -> str:
    """What the option accepts, in words: 'an integer >= 1', 'one of lstm, gru', ...
    (``cli``: for a flag's help, where an unset option is simply not given)."""
    kinds, optional = _kinds(typ)
    if spec.choices is not None:
        text = "one of " + ", ".join(str(c) for c in spec.choices)
    elif "bool" in kinds:
        text = "true or false"
    elif "ints" in kinds or "floats" in kinds:
        count = f"{spec.length} " if spec.length is not None else ""
        text = f"a list of {count}" + ("integers" if "ints" in kinds else "numbers")
        if spec.min is not None:
            text += f" >= {spec.min:g}"
    elif "str" in kinds and len(kinds) == 1:
        text = "a text"
    else:
        text = "an integer" if "float" not in kinds else "a number"
        bounds = []
        if spec.above is not None:
            bounds.append(f"> {spec.above:g}")
        if spec.min is not None:
            bounds.append(f">= {spec.min:g}")
        if spec.max is not None:
            bounds.append(f"<= {spec.max:g}")
        if bounds:
            text += " " + " and ".join(bounds)
    return text + (" (or null)" if optional and spec.choices is None and not cli else "")


def _bad(where: str, typ, spec: Spec, value) -> ConfigError:
    shown = repr(value) if isinstance(value, str) else value
    return ConfigError(f"{where} must be {describe(typ, spec)}, got {shown}")


def check(value, typ, spec: Spec, where: str):
    """``value`` if it is of ``typ`` and within ``spec``; ConfigError naming ``where`` if not.

    Integers are accepted where a number is; a number is never accepted as a text, nor a
    text ("4") as a number, nor true/false as a number; NaN and infinities are refused.
    """
    kinds, optional = _kinds(typ)
    if value is None:
        if optional:
            return None
        raise _bad(where, typ, spec, "null")
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, int)):
        value = int(value)  # numpy integers
    elif isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):
        value = float(value)  # numpy floats
    if isinstance(value, bool):
        if "bool" not in kinds:
            raise _bad(where, typ, spec, value)
        return value
    if ("ints" in kinds or "floats" in kinds) and isinstance(value, (list, tuple)):
        number = (int,) if "ints" in kinds else (int, float)
        if not all(isinstance(v, number) and not isinstance(v, bool) and math.isfinite(v) for v in value):
            raise _bad(where, typ, spec, list(value))
        out = tuple(value if "ints" in kinds else (float(v) for v in value))
        if spec.length is not None and len(out) != spec.length:
            raise _bad(where, typ, spec, list(value))
        for v in out:
            _check_range(v, typ, spec, where)
        return out
    if isinstance(value, int) and ("int" in kinds or "float" in kinds):
        value = value if "int" in kinds else float(value)
    elif isinstance(value, float) and "float" in kinds:
        if not math.isfinite(value):
            raise _bad(where, typ, spec, value)
    elif isinstance(value, str) and "str" in kinds:
        pass
    else:
        raise _bad(where, typ, spec, value)
    if spec.choices is not None and value not in spec.choices:
        raise _bad(where, typ, spec, value)
    _check_range(value, typ, spec, where)
    return value


def _check_range(value, typ, spec: Spec, where: str) -> None:
    if isinstance(value, str):
        return
    if ((spec.min is not None and value < spec.min) or (spec.max is not None and value > spec.max)
            or (spec.above is not None and value <= spec.above)):
        raise _bad(where, typ, spec, value)


def parse_text(text: str, typ, spec: Spec, where: str):
    """A command-line value (text) converted to ``typ`` and checked; the same errors as
    ``check``. 'none'/'null' give None where the option allows it."""
    kinds, optional = _kinds(typ)
    t = text.strip()
    if optional and t.lower() in ("none", "null"):
        return None
    if "bool" in kinds:
        low = t.lower()
        if low in ("true", "1", "yes", "on"):
            return check(True, typ, spec, where)
        if low in ("false", "0", "no", "off"):
            return check(False, typ, spec, where)
        raise _bad(where, typ, spec, text)
    if "ints" in kinds or "floats" in kinds:
        conv = int if "ints" in kinds else float
        try:
            return check([conv(v) for v in t.split(",") if v.strip()], typ, spec, where)
        except ValueError:
            raise _bad(where, typ, spec, text) from None
    if "int" in kinds:
        try:
            return check(int(t), typ, spec, where)
        except ValueError:
            if "float" not in kinds:
                raise _bad(where, typ, spec, text) from None
    if "float" in kinds:
        try:
            return check(float(t), typ, spec, where)
        except ValueError:
            raise _bad(where, typ, spec, text) from None
    return check(t, typ, spec, where)


def check_section(cls, values, where: str, exclude=()) -> dict:
    """A config-file section for the dataclass ``cls``: a mapping of declared field names
    to valid values. Unknown keys and bad values are ConfigErrors naming ``where.key``."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping of option names to values, got {type(values).__name__}")
    declared = {name: (typ, spec) for name, typ, spec, _ in specs(cls) if name not in exclude}
    unknown = sorted(set(values) - set(declared))
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(declared))})")
    return {k: check(v, *declared[k], f"{where}.{k}") for k, v in values.items()}


def check_instance(obj) -> None:
    """Check every declared field of a dataclass instance (the Python API's entry point)."""
    name = type(obj).__name__
    for fname, typ, spec, _ in specs(type(obj)):
        setattr(obj, fname, check(getattr(obj, fname), typ, spec, f"{name}.{fname}"))


def add_arguments(parser: argparse.ArgumentParser, cls, names=None, default_text: str | None = None) -> None:
    """Add the flags of ``cls``'s options (those with a flag; ``names`` to choose some).
    Values stay text here; ``parsed`` converts and checks them through the declaration.
    ``default_text`` replaces the declared defaults in the help (where the command picks
    them, e.g. by data kind)."""
    for name, typ, spec, default in specs(cls):
        if spec.flag is None or (names is not None and name not in names):
            continue
        kinds, _ = _kinds(typ)
        if default_text is not None:
            shown = f"; default {default_text}"
        else:
            shown = "" if default is None or default is dataclasses.MISSING else f"; default {default}"
        help_ = f"{spec.help} ({describe(typ, spec, cli=True)}{shown})"
        if kinds == {"bool"} and default is False:
            parser.add_argument(spec.flag, dest=name, action="store_const", const="true",
                                default=None, help=spec.help)
        else:
            parser.add_argument(spec.flag, dest=name, default=None, help=help_,
                                metavar=spec.metavar or name.upper())


def parsed(cls, namespace, names=None) -> dict:
    """{field: value} for the flags of ``cls`` that were given on the command line."""
    out = {}
    for name, typ, spec, _ in specs(cls):
        if spec.flag is None or (names is not None and name not in names):
            continue
        text, where = getattr(namespace, name, None), spec.flag
        if text is None and spec.env is not None and os.environ.get(spec.env) is not None:
            text, where = os.environ[spec.env], f"${spec.env}"  # checked like the flag
        if text is not None:
            out[name] = parse_text(str(text), typ, spec, where)
    return out


def defaults(cls) -> dict:
    return {name: default for name, _, _, default in specs(cls)}
