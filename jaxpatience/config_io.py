"""Reading configs: strict YAML files, `section.key=value` overrides, and the command line every command shares.

A config is a frozen dataclass (config.py); `load_config(cls, path, overrides)` builds one from a YAML file that
states only what differs from the defaults, then `key=value` overrides. Loading is strict: an unknown key, or a
value of the wrong kind, is an error that names the key. `command_parser` + `config_from_args` give every command
the same line: `--config FILE`, its flags (each an alias of a key), then `key=value`, the last one winning.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import types
import typing
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user-facing configuration problem; the message is one sentence naming the file or key."""


# ---------------------------------------------------------------------------------------------------
# Generic strict loading of nested frozen dataclasses from YAML and `a.b=value` overrides.


def _parse_scalar(text: str) -> Any:
    """`key=value` values are parsed as YAML scalars: 3 → int, 1e-5 → float, true → bool, null → None."""
    value = yaml.safe_load(text)
    if isinstance(value, str) and not text.lstrip().startswith(('"', "'")):
        try:  # YAML 1.1 reads "1e-5" as a string; accept it as a float.
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings to a nested dict (returns a new dict)."""
    tree = json.loads(json.dumps(tree))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value.")
        dotted, text = item.split("=", 1)
        node = tree
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {key!r} is not a section.")
        node[leaf] = _parse_scalar(text)
    return tree


def from_dict(cls: type, data: dict, where: str = "", *, build: bool = True) -> Any:
    """Build dataclass `cls` from `data`, recursing into dataclass-typed fields; unknown keys are errors.

    where: the dotted key of `data` ("" at the top), named in errors. build=False only checks the keys and kinds
    (a partial tree, e.g. the command line's overrides alone) and returns the checked dict.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'the config'} must be a mapping, got {type(data).__name__}.")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in known:
            raise ConfigError(f"unknown key {dotted!r} (known in {where or 'the top level'}: {', '.join(known)}).")
        field_type = _dataclass_in(hints[key])
        if field_type is None:  # a float is finite unless its field says `metadata={"nonfinite": True}`
            value = _typed(value, hints[key], dotted, finite=not known[key].metadata.get("nonfinite", False))
        elif isinstance(value, dict):  # the keys it sets, laid over the field's own default section
            value = from_dict(field_type, _merged(_default_section(known[key]), value), dotted, build=build)
        elif value is not None or type(None) not in typing.get_args(hints[key]):  # `lora: null` turns LoRA off
            nullable = " or null" if type(None) in typing.get_args(hints[key]) else ""
            raise ConfigError(f"{dotted} must be a section of keys{nullable}, not {value!r}.")
        kwargs[key] = value
    if not build:
        return kwargs
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{where or 'the config'}: {err}.") from None


def _default_section(field: dataclasses.Field) -> dict:
    """The default of a section-typed field as plain data: `training.train.batch_size=8` changes that one key of
    IrpoConfig's own `training` default (DPO + NLL, one epoch), not of a bare RunConfig."""
    if field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    else:
        default = None if field.default is dataclasses.MISSING else field.default
    return dataclasses.asdict(default) if dataclasses.is_dataclass(default) else {}


_SECRET = re.compile(r"(key|secret|password|token)$", re.IGNORECASE)  # settings whose values are never shown
_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "text"}


def _typed(value: Any, hint: Any, where: str, *, finite: bool = True) -> Any:
    """`value` checked against a field's type hint (bool, int, float, str, tuples, unions of them), so a bad value
    is one sentence naming its key; ints become floats where a float is expected, lists become tuples.

    finite: a float must be a finite number (`inf`, `nan`, YAML's `.inf` are refused): the one door every numeric
    setting of every config passes, so no field has to remember it (each config's own checks add its range)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        kinds = [o for o in options if o is not type(None)]
        if len(kinds) == 1:  # X | None: X's own message names what is wrong inside it
            return _typed(value, kinds[0], where, finite=finite)
        for option in kinds:
            try:
                return _typed(value, option, where, finite=finite)
            except ConfigError:
                continue
        names = " or ".join(_KINDS.get(o, getattr(o, "__name__", str(o))) for o in kinds)
        shown = "the value given" if _SECRET.search(where) else repr(value)
        raise ConfigError(f"{where} must be {names}{' or null' if type(None) in options else ''}, not {shown}.")
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, not {value!r}.")
        item = typing.get_args(hint)[0] if typing.get_args(hint) else Any
        return tuple(_typed(v, item, f"{where}[{i}]", finite=finite) for i, v in enumerate(value))
    if hint is str and value is None:  # `key=` or an empty YAML value: empty text ("not set" where that matters)
        return ""
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "1e-5" as text
        try:
            return float(value)
        except ValueError:
            pass
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }.get(hint)
    if ok is None:
        return tuple(value) if isinstance(value, list) else value
    if not ok(value):
        shown = "the value given" if _SECRET.search(where) else repr(value)  # never echo a key
        raise ConfigError(f"{where} must be {_KINDS[hint]}, not {shown}.")
    if hint is int and not -(2**63) <= value < 2**63:  # past any counter, size or seed the program can use
        raise ConfigError(f"{where} must be an integer of at most 63 bits, not {value!r}.")
    if hint is float:
        try:
            number = float(value)
        except OverflowError:  # an integer past float's range
            number = math.inf
        if finite and not math.isfinite(number):
            raise ConfigError(f"{where} must be a finite number, not {value!r}.")
        return number
    return value


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass type in `hint` (`X`, `X | None`), if any."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), None)
    return None


# ---------------------------------------------------------------------------------------------------
# argparse types for the numeric options that are not config keys (plan, --stop-after, launch.py): a bad value
# is argparse's one line naming the option ("argument --seed: must be ..."), exit 2, before anything runs.


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, not {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {'positive' if low == 1 else f'>= {low}'}, not {value}")
    return value


def finite_float(min: float | None = None, *, above: float | None = None) -> typing.Callable[[str], float]:
    """An argparse type: a finite number, >= `min` and > `above` where given (`type=finite_float(min=0)`)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, not {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}")
        if (min is not None and value < min) or (above is not None and value <= above):
            raise argparse.ArgumentTypeError(f"must be {f'>= {min}' if min is not None else f'> {above}'}, not {text}")
        return value

    parse.__name__ = "number"  # argparse names the type in its fallback message
    return parse


def read_json(path: str | Path, what: str = "") -> Any:
    """A JSON file the program reads back (a run's settings, a summary, an adapter's config): a damaged one (cut
    by a crash, edited by hand) is one sentence naming it, not the parser's message."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        problem = "is not UTF-8 text"
    except json.JSONDecodeError as err:
        problem = f"is not valid JSON ({err.msg} at line {err.lineno})"
    raise ConfigError(f"{what or path} {problem}{f' ({path})' if what else ''}; restore or delete it.")


def check_output_dir(path: str | Path, key: str) -> None:
    """One sentence if `path` cannot become an output folder (a file in its place or above it, no permission to
    write); creates nothing, so a refused run leaves nothing behind."""
    path = Path(path)
    for existing in (path, *path.absolute().parents):
        if not existing.exists():
            continue
        if not existing.is_dir():
            what = "a file" if existing.is_file() else "a special file (a FIFO, device or socket)"
            where = f"is {what}" if existing == path else f"lies under the file {existing}"
            raise ConfigError(f"{key} {path} {where}, not a folder; choose another one.")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"{key} {path}: no permission to write in {existing}.")
        return


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key written twice in one mapping (PyYAML keeps the last without a word).
    Keys that a merge (`<<: *anchor`) brings in may still be overridden: that is what a merge is for."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, Hashable) and key in seen:
                raise ConfigError(
                    f"{self.name}: key {key!r} is written twice (lines {seen[key]} and {line}); keep one of them."
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _check_readable_file(path: Path, what: str) -> None:
    """One sentence unless `path` is a regular file: a folder, a FIFO or a device is named as what it is (opening
    a FIFO would wait for a writer forever)."""
    if not path.exists():
        raise ConfigError(f"{what} {path} does not exist.")
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder, not a file; give a YAML file.")
    if not path.is_file():
        raise ConfigError(f"{what} {path} is not a regular file (a FIFO, socket or device); give a YAML file.")


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    _check_readable_file(path, "config file")
    try:
        text = path.read_text(encoding="utf-8")
        loader = _StrictLoader(text)
        loader.name = str(path)
        try:
            data = loader.get_single_data() or {}
        finally:
            loader.dispose()
    except yaml.YAMLError as err:  # one line: the problem and where, not PyYAML's drawing of it
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(
            f"{path} is not valid YAML{where} ({getattr(err, 'problem', None) or 'unreadable'})."
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text.") from None
    except OSError as err:  # no permission to read, an I/O error
        raise ConfigError(f"config file {path} cannot be read ({err.strerror or err}).") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level.")
    return data


# ---------------------------------------------------------------------------------------------------
# Every command reads its config the same way: a YAML file, then flags (aliases of keys), then key=value.


CONFIG_HELP = "YAML config; keys not given keep their defaults"


def load_config(
    cls: type,
    path: str | Path | Sequence[str | Path] | None = None,
    overrides: Sequence[str] = (),
    *,
    base: str | Path | None = None,
) -> Any:
    """A `cls` from YAML files and `section.key=value` overrides; strict about unknown keys.

    path: a YAML file, or several (`--config a.yaml --config b.yaml`), laid over each other in order.
    base: a YAML file read first (the demo's recipe); `path` then states only what differs from it.
    """
    paths = [path] if isinstance(path, str | Path) else list(path or ())
    data: dict = {}
    for file in [*([base] if base else []), *paths]:  # each file checked alone, so a bad key is blamed on its file
        layer = load_yaml(file)
        try:
            from_dict(cls, layer, build=False)
        except ConfigError as err:
            raise ConfigError(f"{file}: {err}") from None
        data = _merged(data, layer)
    try:  # a bad key=value is the command line's fault, not the file's: check those alone first
        from_dict(cls, apply_overrides({}, list(overrides)), build=False)
    except ConfigError as err:
        raise ConfigError(f"command line: {err}") from None
    try:
        from_dict(cls, data, build=False)
    except ConfigError as err:  # each file was sound alone: what is wrong comes from laying them over each other
        raise ConfigError(f"{', '.join(str(p) for p in paths or [base])}: {err}") from None
    return from_dict(cls, apply_overrides(data, list(overrides)))


def changed_keys(before: dict, after: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two config dicts (`train.loss.beta`, not just `train`)."""
    keys = []
    for key in sorted(before.keys() | after.keys(), key=str):
        a, b = before.get(key), after.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def _merged(tree: dict, update: dict) -> dict:
    """`tree` with `update` laid over it, section by section (a new dict)."""
    out = dict(tree)
    for key, value in update.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both else value
    return out


def command_parser(
    prog: str, description: str, aliases: dict[str, tuple[str, str]] | None = None, config_help: str = CONFIG_HELP
) -> argparse.ArgumentParser:
    """An argparse parser with `--config FILE`, `key=value` overrides and `aliases`: {"--flag": (key, help)}.

    A flag is the same as `key=VALUE`; a value `a=1,b=2` sets keys of a section (`--mesh data=8` = `mesh.data=8`).
    Commands add their own options (not config keys) to the returned parser.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(  # given twice or more: the files are laid over each other in order, the last winning
        "--config", metavar="FILE", action="append", help=f"{config_help} (repeat to layer files, the last winning)"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config keys: section.key=value")
    for flag, (key, help_text) in (aliases or {}).items():
        parser.add_argument(flag, dest=_alias_dest(key), metavar="VALUE", help=f"{help_text} (= {key}=VALUE)")
    parser.set_defaults(_aliases=dict(aliases or {}))
    return parser


def _alias_dest(key: str) -> str:
    return "alias__" + key.replace(".", "__")


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """The config of a parsed command line: YAML file < flags < key=value overrides.

    A flag's value is taken as typed for a text field (`--model yes` is the path "yes", not a boolean) and split
    into keys for a section (`--mesh data=8,fsdp=2`).
    """
    overrides = []
    for key, _ in args._aliases.values():
        value = getattr(args, _alias_dest(key))
        if value is None:
            continue
        hint = _field_hint(cls, key)
        if _dataclass_in(hint) is not None:  # a section's keys: "data=8,fsdp=2"
            overrides += [f"{key}.{item.strip()}" for item in value.split(",") if item.strip()]
        elif hint is str or set(typing.get_args(hint)) == {str, type(None)}:
            overrides.append(f"{key}={json.dumps(value)}")  # a quoted YAML scalar: stays the text it is
        else:
            overrides.append(f"{key}={value}")
    return load_config(cls, args.config, overrides + list(args.overrides))


def _field_hint(cls: type, dotted: str) -> Any:
    """The type hint of the field `a.b.c` of dataclass `cls` (None if there is no such field)."""
    hint: Any = cls
    for name in dotted.split("."):
        owner = _dataclass_in(hint)
        if owner is None:
            return None
        hint = typing.get_type_hints(owner).get(name)
    return hint


def check_range(
    key: str, value: float | None, low: float | None = None, high: float | None = None, *, above: float | None = None
) -> None:
    """One sentence naming `key` unless `value` (None passes) is finite, >= low, <= high and > above."""
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, not {value!r}.")
    if (low is None or value >= low) and (high is None or value <= high) and (above is None or value > above):
        return
    bounds = [f">= {low}"] * (low is not None) + [f"> {above}"] * (above is not None)
    bounds += [f"<= {high}"] * (high is not None)
    raise ConfigError(f"{key} must be {' and '.join(bounds)}, not {value!r}.")
