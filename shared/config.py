"""Frozen dataclass configs <-> strict JSON, and command-line flags generated from the same fields.

Loading is strict: an unknown key or a value of the wrong type is an error naming the key, so a
config written by a newer or mistyped run never loads silently into something else.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from shared.errors import UserError

ConfigT = TypeVar("ConfigT")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return {field.name: _to_json_value(getattr(config, field.name)) for field in dataclasses.fields(config)}


def _to_json_value(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_to_json_value(item) for item in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)  # a nested options dataclass
    return value


def config_from_dict(config_class: type[ConfigT], values: dict[str, Any], source: str = "config") -> ConfigT:
    """Build `config_class` from `values`, refusing unknown keys and values of the wrong type."""
    fields = {field.name: field for field in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(
            f"{source}: unknown key {unknown[0]!r} for {config_class.__name__}; "
            f"known keys are {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(config_class)
    converted = {name: _coerce(hints[name], value, f"{source}: key {name!r}") for name, value in values.items()}
    for name, value in converted.items():
        _check_choice(fields[name], value, f"{source}: key {name!r}")
    try:
        return config_class(**converted)
    except TypeError as error:  # a required key is missing
        raise UserError(f"{source}: {error}") from None


def _coerce(annotation: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (arg for arg in args if arg is not type(None)):
            try:
                return _coerce(option, value, where)
            except UserError as error:
                errors.append(str(error))
        raise UserError(errors[0] if errors else f"{where} may not be null")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where} must be a list, got {value!r}")
        item_type = args[0] if args else Any
        return tuple(_coerce(item_type, item, where) for item in value)
    if origin is typing.Literal:
        if value not in args:
            raise UserError(f"{where} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if annotation is Any:
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise UserError(f"{where} must be a string, got {value!r}")
        return value
    return value


def write_json_atomic(path: str | os.PathLike, values: dict[str, Any]) -> None:
    """Write JSON to a temporary file beside `path`, then rename: a reader never sees half a file."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "w") as handle:
        handle.write(json.dumps(values, indent=2, sort_keys=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON object, with a one-line error naming the file when it is missing or broken."""
    path = Path(path)
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error}); restore or re-create the file") from None
    if not isinstance(values, dict):
        raise UserError(f"{path} must hold a JSON object")
    return values


# ---------------------------------------------------------------------------------------------
# Command-line flags from dataclass fields: one definition gives the flag, its type, default and help.
# ---------------------------------------------------------------------------------------------

def option(default: Any, help: str, choices: Callable[[], Sequence[str]] | None = None, flag: bool = True) -> Any:
    """A dataclass field with help text for its command-line flag. `choices` (a function, so that a registry
    filled after this module is imported can supply them) lists the values a string field accepts;
    `flag=False` keeps the field off the command line (a setting that only old folders carry)."""
    if isinstance(default, (list, dict)):
        raise TypeError("use a tuple default")
    metadata = {"help": help, "flag": flag} if choices is None else {"help": help, "flag": flag, "choices": choices}
    return dataclasses.field(default=default, metadata=metadata)


def field_choices(field: dataclasses.Field) -> list[str] | None:
    """The values a field accepts, from its `option(choices=...)`, or None for any."""
    choices = field.metadata.get("choices")
    return list(choices()) if choices is not None else None


def _check_choice(field: dataclasses.Field, value: Any, where: str) -> None:
    choices = field_choices(field)
    if choices is not None and value is not None and value not in choices:
        raise UserError(f"{where}: unknown value {value!r}; registered: {', '.join(choices)}")


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type, skip: frozenset[str] = frozenset()) -> None:
    """Add one `--flag-name` per field of `config_class` (booleans get `--flag/--no-flag`)."""
    for field in dataclasses.fields(config_class):
        if field.name not in skip and field.metadata.get("flag", True):
            add_field_argument(parser, config_class, field)


def add_field_argument(parser: argparse.ArgumentParser, config_class: type, field: dataclasses.Field,
                       help_suffix: str = "") -> None:
    """Add the flag of one field of `config_class`; its value lands under the field's name, absent when not given."""
    hints = typing.get_type_hints(config_class)
    flag = "--" + field.name.replace("_", "-")
    annotation = hints[field.name]
    help_text = _field_help(config_class, field.name) + help_suffix
    default = field.default
    kwargs: dict[str, Any] = {"dest": field.name, "default": argparse.SUPPRESS}
    shown_default = f" (default: {default})" if default is not dataclasses.MISSING else ""
    base, optional = _strip_optional(annotation)
    if base is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text + shown_default, **kwargs)
    elif typing.get_origin(base) is tuple:
        parser.add_argument(flag, nargs="+", type=typing.get_args(base)[0], help=help_text + shown_default, **kwargs)
    elif typing.get_origin(base) is typing.Literal:
        parser.add_argument(flag, choices=list(typing.get_args(base)), help=help_text + shown_default, **kwargs)
    elif field_choices(field) is not None:
        parser.add_argument(flag, choices=field_choices(field), help=help_text + shown_default, **kwargs)
    else:
        parser.add_argument(flag, type=_optional_parser(base) if optional else base, help=help_text + shown_default,
                            **kwargs)


def _field_help(config_class: type, name: str) -> str:
    """The help of field `name`, from the nearest class that gives one (a subclass may redeclare a
    field only to change its default)."""
    for klass in config_class.__mro__:
        field = getattr(klass, "__dataclass_fields__", {}).get(name)
        if field is not None and field.metadata.get("help"):
            return field.metadata["help"]
    return ""


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _optional_parser(base: type):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else base(text)
    parse.__name__ = base.__name__
    return parse


def values_from_args(config_class: type, namespace: argparse.Namespace,
                     exclude: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The parsed flags that belong to `config_class` and were given (absent flags are not in the dict)."""
    names = {field.name for field in dataclasses.fields(config_class)} - exclude
    return {name: value for name, value in vars(namespace).items() if name in names}


def config_from_args(config_class: type[ConfigT], namespace: argparse.Namespace) -> ConfigT:
    """Build `config_class` from the parsed flags that belong to it; absent flags keep their defaults."""
    return config_from_dict(config_class, values_from_args(config_class, namespace), source="command line")


def build_parser(description: str, *config_classes: type, skip: frozenset[str] = frozenset()) -> argparse.ArgumentParser:
    """An argument parser with the flags of every field of `config_classes`: a name shared by several
    classes gets the first class's flag; names in `skip` get none."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    seen = set(skip)
    for config_class in config_classes:
        add_config_arguments(parser, config_class, skip=frozenset(seen))
        seen |= {field.name for field in dataclasses.fields(config_class)}
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Any) -> argparse.Namespace:
    """parse_args, but a bad flag is a UserError (one line, exit 2 through run_cli) rather than usage text."""
    def fail(message: str) -> None:
        raise UserError(f"{message}; see --help")

    parser.error = fail  # type: ignore[method-assign]
    return parser.parse_args(argv)
