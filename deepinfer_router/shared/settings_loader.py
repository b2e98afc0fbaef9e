"""Settings from flags > environment > TOML file > defaults, for any pydantic-settings class.

One pydantic model defines every option once; the command-line parser, the environment
names (`<PREFIX><FLAG>`, repeatable options comma-separated), the TOML keys (snake_case)
and the example TOML file are all derived from it, so they cannot drift apart.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import BeforeValidator, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    TomlConfigSettingsSource,
)

S = TypeVar("S", bound=BaseSettings)


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


# A repeatable option: `--flag a --flag b`, `PREFIX_FLAG=a,b`, or `flag = ["a", "b"]`.
CsvList = Annotated[list[str], NoDecode, BeforeValidator(_split_csv)]


class SettingsError(Exception):
    """A bad option value; the message is one line naming the option."""


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _is_list(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _is_list(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return any(_is_list(a) for a in typing.get_args(annotation) if a is not type(None))
    return origin is list


def _is_bool(annotation: Any) -> bool:
    if annotation is bool:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, Annotated):
        return any(_is_bool(a) for a in typing.get_args(annotation) if a is not type(None))
    return False


def _is_table(annotation: Any) -> bool:
    """A dict of tables: TOML (or JSON in the environment) only, no flag."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _is_table(typing.get_args(annotation)[0])
    return origin is dict


def _choices(annotation: Any) -> list[str] | None:
    if typing.get_origin(annotation) is typing.Literal:
        return [str(a) for a in typing.get_args(annotation)]
    return None


def _help(info: FieldInfo) -> str:
    text = info.description or ""
    default = info.get_default(call_default_factory=True)
    if default not in (None, [], "", False):
        text += f" (default: {default})"
    return text.replace("%", "%%")  # argparse formats help strings with %


def add_settings_arguments(
    parser: argparse.ArgumentParser, cls: type[BaseSettings], skip: Sequence[str] = ()
) -> None:
    """Add one flag per settings field. Defaults are suppressed so that only flags the
    user typed override the environment and the file."""
    for name, info in cls.model_fields.items():
        ann = info.annotation
        if name in skip or _is_table(ann):
            continue
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": _help(info)}
        if _is_bool(ann):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif _is_list(ann):
            kwargs["action"] = "append"
            kwargs["metavar"] = name.upper()
        else:
            kwargs["metavar"] = name.upper()
            choices = _choices(ann)
            if choices:
                kwargs["choices"] = choices
                kwargs["metavar"] = None
        parser.add_argument(flag_name(name), **kwargs)


def _describe_error(cls: type[BaseSettings], exc: ValidationError, env_prefix: str) -> str:
    err = exc.errors()[0]
    loc = str(err["loc"][0]) if err["loc"] else ""
    if loc in cls.model_fields:
        where = f"{flag_name(loc)} (env {env_prefix}{loc.upper()}, TOML key {loc})"
    else:
        where = f"option {loc!r}" if loc else "settings"
    msg = err["msg"].removeprefix("Value error, ")  # pydantic's prefix for our own checks
    return f"invalid {where}: {msg}"


def load_settings(
    cls: type[S],
    cli_values: dict[str, Any],
    config_file: str | Path | None,
    env_prefix: str,
) -> S:
    """Merge flag values (highest), `env_prefix`-ed environment variables, the TOML file
    and defaults, and validate. Raises SettingsError with a one-line message."""
    toml_path = Path(config_file) if config_file else None
    if toml_path is not None and not toml_path.is_file():
        raise SettingsError(f"config file not found: {toml_path}")

    class _Loaded(cls):  # type: ignore[valid-type,misc]
        model_config = {**cls.model_config, "env_prefix": env_prefix, "extra": "forbid"}

        @classmethod
        def settings_customise_sources(
            cls_,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
            if toml_path is not None:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
            return tuple(sources)

    try:
        loaded = _Loaded(**cli_values)
    except ValidationError as exc:
        raise SettingsError(_describe_error(cls, exc, env_prefix)) from None
    except ValueError as exc:  # e.g. TOML syntax errors
        raise SettingsError(f"cannot read settings: {exc}") from None
    return cls.model_validate(loaded.model_dump())


def parse_or_exit(
    cls: type[S], cli_values: dict[str, Any], config_file: str | None, env_prefix: str, prog: str
) -> S:
    try:
        return load_settings(cls, cli_values, config_file, env_prefix)
    except SettingsError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _toml_value(value: Any) -> str:
    import tomli_w  # only needed to regenerate the example file

    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


def render_example_toml(cls: type[BaseSettings], title: str, env_prefix: str) -> str:
    """The example TOML: every option, commented, with its default."""
    lines = [f"# {title}", "#", f"# Precedence: command-line flag > environment ({env_prefix}*) >"
             " this file > default.", "# Keys are the flag names in snake_case.", ""]
    for name, info in cls.model_fields.items():
        for desc_line in (info.description or name).splitlines():
            lines.append(f"# {desc_line}")
        lines.append(f"# flag {flag_name(name)}, env {env_prefix}{name.upper()}")
        default = info.get_default(call_default_factory=True)
        example = (info.json_schema_extra or {}).get("toml_example") if isinstance(
            info.json_schema_extra, dict) else None
        lines[-1] = lines[-1] if not _is_table(info.annotation) else (
            f"# TOML or env {env_prefix}{name.upper()} (JSON) only")
        if isinstance(example, str):
            lines.extend("# " + line if line else "#" for line in example.splitlines())
        elif default is None:
            lines.append(f"# {name} =")
        else:
            lines.append(f"{name} = {_toml_value(default)}")
        lines.append("")
    return "\n".join(lines)
