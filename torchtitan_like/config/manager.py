"""Build a `JobConfig` from defaults, a TOML file and command-line overrides (CLI > TOML > defaults).

Every user mistake raises `ConfigError` naming the file, the `section.key`, the value and what is
allowed; nothing here touches devices or process groups, so errors surface before any collective.
"""

from __future__ import annotations

import json
import math
import os
import sys
import typing
from dataclasses import asdict, fields
from typing import Any, Sequence

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

from torchtitan_like.config.job_config import SECTIONS, JobConfig
from torchtitan_like.errors import ConfigError, did_you_mean

# TorchTitan sections we accept and ignore (with a warning) so its TOMLs load unchanged.
IGNORED_TORCHTITAN_SECTIONS = ("experimental", "fault_tolerance", "memory_estimation", "mx")
# TorchTitan spells the float8 section [quantize.linear.float8]; it maps onto our [float8].
# TorchTitan's other [quantize.*] tables: features we do not implement, ignored with a warning.
TORCHTITAN_ONLY_QUANTIZE = ("linear.mx", "grouped_mm.float8", "grouped_mm.mx")
MAX_INT64 = 2**63 - 1


def _type_name(tp: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}.get(tp, str(tp))


def _field_types(section_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: (hints[f.name], f) for f in fields(section_cls)}


def _coerce(value: Any, tp: type, where: str) -> Any:
    """Check a TOML value's type (ints are accepted where floats are expected)."""
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # TOML integers have no size limit; beyond 1.8e308 there is no float
            raise ConfigError(f"{where}: an integer of {len(str(abs(value)))} digits is beyond the largest number "
                              f"(about 1.8e308); expected a finite number") from None
    if tp is bool and isinstance(value, bool):
        return value
    if tp is list and isinstance(value, list):
        return _check_list_items(value, where)
    if tp is not bool and isinstance(value, tp) and not isinstance(value, bool):
        return value
    raise ConfigError(f"{where} = {value!r}: expected {_type_name(tp)}, got {type(value).__name__}")


def _check_list_items(value: list, where: str) -> list:
    """Every list key holds names (module names, components, state keys): strings only."""
    for item in value:
        if not isinstance(item, str):
            raise ConfigError(f"{where} = {value!r}: expected a list of strings, got {item!r} ({type(item).__name__})")
    return value


def _parse_cli_value(text: str | None, tp: type, where: str) -> Any:
    """Parse a command-line string into the field's type; `None` is a bare `--section.key`."""
    if text is None:
        if tp is bool:
            return True
        raise ConfigError(f"{where}: needs a value ({_type_name(tp)}); only boolean keys may be given bare")
    if tp is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"{where} = {text!r}: expected a boolean (true/false)")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{where} = {text!r}: expected an integer") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{where} = {text!r}: expected a number") from None
    if tp is list:
        text = text.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                raise ConfigError(f"{where} = {text!r}: expected a list such as [\"a\", \"b\"] or a,b") from None
            if not isinstance(value, list):
                raise ConfigError(f"{where} = {text!r}: expected a list such as [\"a\", \"b\"] or a,b")
            return _check_list_items(value, where)
        return [item.strip() for item in text.split(",") if item.strip()]
    return text


def _check_constraints(value: Any, f, where: str) -> None:
    meta = f.metadata
    if isinstance(value, float) and not math.isfinite(value):  # TOML and float() both read inf and nan
        raise ConfigError(f"{where} = {value!r}: expected a finite number")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        allowed = ", ".join(map(str, choices))
        raise ConfigError(f"{where} = {value!r} is not allowed{did_you_mean(str(value), map(str, choices))}; "
                          f"allowed: {allowed}")
    bounds = dict(meta)
    if isinstance(value, int) and not isinstance(value, bool) and bounds.get("le") is None:
        bounds["le"] = MAX_INT64  # torch, numpy and C++ take integers as int64: a larger one overflows there
    for bound, test, text in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                              ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
        limit = bounds.get(bound)
        if limit is not None and isinstance(value, (int, float)) and not test(value, limit):
            raise ConfigError(f"{where} = {value!r} is out of range: must be {text} {format_bound(limit)}")


def format_bound(limit: float) -> str:
    """A bound as written in messages and docs/config.md: integers whole (2**64 - 1 is no 1.84467e+19)."""
    return str(limit) if isinstance(limit, int) else f"{limit:g}"


def _flatten_float8_alias(data: dict, source: str, warn=print) -> dict:
    """Map TorchTitan's [quantize.linear.float8] onto [float8]; its other [quantize.*] tables (MX,
    grouped-GEMM quantization) are TorchTitan-only and ignored with a warning, like [mx]."""
    if "quantize" not in data:
        return data
    quantize = data["quantize"]
    if not isinstance(quantize, dict):
        raise ConfigError(f"{source}: [quantize] must be a table of keys, got {quantize!r}")
    allowed = ", ".join(f"[quantize.{name}]" for name in ("linear.float8", *TORCHTITAN_ONLY_QUANTIZE))
    data = {k: v for k, v in data.items() if k != "quantize"}
    for kind, tables in quantize.items():
        if not isinstance(tables, dict):
            raise ConfigError(f"{source}: [quantize.{kind}] must be a table of tables; allowed: {allowed}")
        for name, table in tables.items():
            path = f"{kind}.{name}"
            if path in TORCHTITAN_ONLY_QUANTIZE:
                warn(f"warning: {source}: section [quantize.{path}] is TorchTitan-only and ignored")
                continue
            if path != "linear.float8":
                raise ConfigError(f"{source}: unknown section [quantize.{path}]; allowed: {allowed}")
            if not isinstance(table, dict):
                raise ConfigError(f"{source}: [quantize.linear.float8] must be a table of keys, got {table!r}")
            if not isinstance(data.get("float8", {}), dict):
                raise ConfigError(f"{source}: [float8] must be a table of keys, got {data['float8']!r}")
            data["float8"] = {**data.get("float8", {}), **table}
    return data


def read_toml(path: str) -> dict:
    """Read a TOML file, turning a missing file or a syntax error into a ConfigError."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: malformed TOML: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text: {err}") from None
    except ValueError as err:  # an integer of more than 4300 digits: Python refuses to convert it
        raise ConfigError(f"{path}: malformed TOML: {err}") from None


def apply_sections(config: JobConfig, data: dict, source: str, warn=print) -> None:
    """Set values from a nested dict `{section: {key: value}}` onto `config`, checking each."""
    data = _flatten_float8_alias(data, source, warn)
    for section, values in data.items():
        if section in IGNORED_TORCHTITAN_SECTIONS:
            warn(f"warning: {source}: section [{section}] is TorchTitan-only and ignored")
            continue
        if section not in SECTIONS and not isinstance(values, dict):  # a key above every [section] header
            homes = [name for name, cls in SECTIONS.items() if section in _field_types(cls)]
            raise ConfigError(f"{source}: key {section} = {values!r} is outside any section; "
                              + (f"put it under [{'] or ['.join(homes)}]" if homes else f"sections: {', '.join(SECTIONS)}"))
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section [{section}]{did_you_mean(section, SECTIONS)}; "
                              f"sections: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section}] must be a table of keys, got {values!r}")
        types = _field_types(SECTIONS[section])
        target = getattr(config, section)
        for key, value in values.items():
            where = f"{source}: {section}.{key}"
            if key not in types:
                raise ConfigError(f"{where}: unknown key{did_you_mean(key, types)}; "
                                  f"keys of [{section}]: {', '.join(types)}")
            tp, f = types[key]
            value = _coerce(value, tp, where)
            _check_constraints(value, f, where)
            setattr(target, key, value)


def parse_cli_overrides(args: Sequence[str]) -> list[tuple[str, str, str | None]]:
    """Turn `--section.key value` / `--section.key=value` pairs into (section, key, text) triples.

    A bare flag (`--compile.enable`) has text None: true for a boolean key, an error for any other.
    """
    overrides, index = [], 0
    while index < len(args):
        arg = args[index]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"command line: unexpected argument {arg!r}; overrides look like --section.key value")
        name, eq, text = arg[2:].partition("=")
        section, _, key = name.partition(".")
        if not eq:
            nxt = args[index + 1] if index + 1 < len(args) else None
            is_flag = nxt is None or (nxt.startswith("--") and not _looks_numeric(nxt))
            if is_flag:
                text = None
            else:
                text = nxt
                index += 1
        overrides.append((section, key, text))
        index += 1
    return overrides


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def apply_cli_overrides(config: JobConfig, overrides: list[tuple[str, str, str | None]]) -> None:
    for section, key, text in overrides:
        if section not in SECTIONS:
            raise ConfigError(f"command line: unknown section --{section}.{key}{did_you_mean(section, SECTIONS)}; "
                              f"sections: {', '.join(SECTIONS)}")
        types = _field_types(SECTIONS[section])
        where = f"command line: {section}.{key}"
        if key not in types:
            raise ConfigError(f"{where}: unknown key{did_you_mean(key, types)}; keys of [{section}]: {', '.join(types)}")
        tp, f = types[key]
        value = _parse_cli_value(text, tp, where)
        _check_constraints(value, f, where)
        setattr(getattr(config, section), key, value)


def load_config(argv: Sequence[str]) -> tuple[JobConfig, bool]:
    """Build the config from `argv` (without the program name).

    Recognized: `--config PATH` (or `--job.config_file PATH`), `--print-config`, and overrides.
    Returns the config and whether `--print-config` was given.
    """
    argv = list(argv)
    print_config = False
    if "--print-config" in argv:
        argv.remove("--print-config")
        print_config = True
    config_path = ""
    rest: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        for flag in ("--config", "--job.config_file"):
            if arg == flag:
                if index + 1 >= len(argv):
                    raise ConfigError(f"command line: {flag} needs a path")
                config_path = argv[index + 1]
                index += 2
            elif arg.startswith(flag + "="):
                config_path = arg.split("=", 1)[1]
                index += 1
            else:
                continue
            if not config_path:  # e.g. an unset shell variable: the run would silently use the defaults
                raise ConfigError(f"command line: {flag} = '': needs the path of a TOML file")
            break
        else:
            rest.append(arg)
            index += 1
    config = JobConfig()
    if config_path:
        apply_sections(config, read_toml(config_path), config_path, warn=_warn)
        config.job.config_file = config_path
    apply_cli_overrides(config, parse_cli_overrides(rest))
    return config, print_config or config.job.print_config


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


def config_to_dict(config: JobConfig) -> dict:
    return asdict(config)


def to_toml(config: JobConfig) -> str:
    """Render the resolved config as TOML (saved into the run folder, printed by --print-config)."""
    lines: list[str] = []
    for section, values in config_to_dict(config).items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


# Keys that say where the config came from or where it lives (the saved file is in that folder),
# not how the run trains.
_NOT_A_SETTING = ("job.config_file", "job.print_config", "job.dump_folder")


def changes_since(previous_path: str, config: JobConfig) -> list[str]:
    """`section.key: old -> new` for every setting of `config` that differs from the config saved at
    `previous_path` (a run's config.toml, written at its last launch), for the log of a relaunch.
    Keys the saved file lacks (added since) are left out; an unreadable file gives no lines."""
    try:
        with open(previous_path, "rb") as handle:
            previous = tomllib.load(handle)
    except (OSError, ValueError):  # missing, unreadable or malformed (TOMLDecodeError is a ValueError)
        return []
    current = tomllib.loads(to_toml(config))  # the same normalization as the saved file
    lines = []
    for section, values in current.items():
        old_values = previous.get(section)
        if not isinstance(old_values, dict):
            continue
        for key, value in values.items():
            name = f"{section}.{key}"
            if key in old_values and old_values[key] != value and name not in _NOT_A_SETTING:
                lines.append(f"{name}: {_toml_value(old_values[key])} -> {_toml_value(value)}")
    return lines
