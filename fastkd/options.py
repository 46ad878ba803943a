"""Settings in one place: each command's config dataclass declares its fields with their help, and
the command line and `--config FILE` are generated from it.

A field is declared with `option(default, "help", ...)`; `add_options` turns a dataclass into
argparse flags (`batch_size` -> `--batch-size`, a bool -> `--bf16/--no-bf16`, a nested dataclass ->
its fields under a prefix, `proxy.steps` -> `--proxy-steps`), and `build` turns parsed values back
into the dataclass. `--config FILE` (JSON, or YAML by its suffix) gives values by field name, flat
or nested; flags on the command line override it; a run's own resolved config file (distill's
OUTPUT/config.json, the others' OUTPUT/<command>-config.json) is such a file. An unknown key, a
value of the wrong type or another command's file is one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path

from .errors import UserError

MISSING = dataclasses.MISSING


def option(default=MISSING, help: str = "", *, factory=MISSING, group: str | None = None, choices=None,
           parse=None, metavar: str | None = None, flag: str | None = None, aliases: tuple[str, ...] = (),
           required: bool = False, cli: bool = True, action: str | None = None, prefix: str | None = None,
           dash_value: bool = False):
    """A config field with what its flag needs. `parse`: str -> value (default: from the annotation);
    `flag`: the flag when not derived from the name; `cli=False`: set by fastkd, never by a user;
    `required`: the command cannot run without it (from the command line or the file); `prefix` (a
    nested dataclass): the flags' prefix, default the field name; `dash_value`: a value may begin
    with '-' (a mapping like -,-,12), which argparse would otherwise read as an option."""
    meta = {"help": help, "group": group, "choices": choices, "parse": parse, "metavar": metavar, "flag": flag,
            "aliases": aliases, "required": required, "cli": cli, "action": action, "prefix": prefix,
            "dash_value": dash_value}
    if factory is not MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _base_type(annotation):
    """int | None -> int; tuple[str, ...] -> tuple; list[str] -> list."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else annotation
    return origin or annotation


def _items(annotation):
    """The element type of tuple[int, ...] / list[str] (Optional unwrapped); str when unsaid."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _items(args[0]) if len(args) == 1 else str
    args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
    return args[0] if args and isinstance(args[0], type) else str


class Spec:
    """One flag: where its value goes (dest, and the field path in the dataclasses) and how a value
    from a file is checked and converted."""

    def __init__(self, path: tuple[str, ...], f: dataclasses.Field, annotation, flag: str, group: str | None):
        self.path, self.field, self.flag, self.group = path, f, flag, group
        self.dest = "_".join(path)
        self.meta = f.metadata
        self.base = _base_type(annotation)
        self.annotation = annotation
        self.optional = type(None) in typing.get_args(annotation)

    @property
    def default(self):
        if self.field.default is not MISSING:
            return self.field.default
        if self.field.default_factory is not MISSING:
            return self.field.default_factory()
        return None

    def from_text(self, text: str):
        parse = self.meta.get("parse")
        if parse is not None:
            return parse(text)
        if self.base in (tuple, list):
            kind = _items(self.annotation)
            values = [kind(t.strip()) for t in text.split(",") if t.strip()]
            return tuple(values) if self.base is tuple else values
        return self.base(text)

    def from_file(self, value, where: str):
        """A value from a config file, checked as the command line would check it."""
        if value is None:
            if self.optional or self.default is None:
                return None
            raise UserError(f"{where}: {self.dest} may not be null")
        if self.base is bool:
            if not isinstance(value, bool):
                raise UserError(f"{where}: {self.dest} must be true or false (got {value!r})")
            return value
        if isinstance(value, (list, tuple)):
            text = ",".join(str(v) for v in value) + ("," if len(value) == 1 else "")
        elif isinstance(value, bool) or isinstance(value, (dict,)):
            raise UserError(f"{where}: {self.dest} must be a {getattr(self.base, '__name__', 'value')} "
                            f"(got {value!r})")
        else:
            text = str(value)
            if self.base is int and isinstance(value, float):
                raise UserError(f"{where}: {self.dest} must be an integer (got {value!r})")
        try:
            converted = self.from_text(text)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            raise UserError(f"{where}: {self.dest}: {exc}") from None
        choices = self.meta.get("choices")
        if choices is not None and converted not in choices:
            raise UserError(f"{where}: {self.dest} must be one of {', '.join(map(str, choices))} (got {converted!r})")
        return converted


def _prefix(f: dataclasses.Field) -> str:
    """A nested dataclass's prefix: its flags', its dests' and its section's in a config file."""
    prefix = f.metadata.get("prefix")
    return f.name if prefix is None else prefix


def specs(cls, path: tuple[str, ...] = (), group: str | None = None) -> list[Spec]:
    """Every command-line field of `cls`, nested dataclasses flattened under their prefixes (and in
    their field's argument group)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        annotation = hints[f.name]
        if dataclasses.is_dataclass(annotation):
            out += specs(annotation, path + ((_prefix(f),) if _prefix(f) else ()), f.metadata.get("group") or group)
            continue
        dest_path = path + (f.name,)
        flag = f.metadata.get("flag") or "--" + "-".join(dest_path).replace("_", "-")
        out.append(Spec(dest_path, f, annotation, flag, f.metadata.get("group") or group))
    return out


def add_options(parser: argparse.ArgumentParser, cls, groups: dict[str, str] | None = None) -> list[Spec]:
    """Flags for every field of `cls`, in argument groups by the fields' `group` (titled by `groups`).
    No flag is required by argparse: a required setting may come from --config (see `build`)."""
    made: dict[str | None, argparse._ArgumentGroup] = {}
    all_specs = specs(cls)
    used = {spec.group for spec in all_specs}
    for key, title in (groups or {}).items():  # the help lists the groups in this order
        if key in used:
            made[key] = parser.add_argument_group(title)
    for spec in all_specs:
        key = spec.group
        if key not in made:
            made[key] = parser.add_argument_group((groups or {}).get(key, key)) if key else parser
        target = made[key]
        help_text = spec.meta.get("help") or ""
        if spec.meta.get("required"):
            help_text += " (required)"
        kwargs = {"dest": spec.dest, "help": help_text or None}
        if spec.base is not bool and spec.meta.get("choices") is None:
            kwargs["metavar"] = spec.meta.get("metavar") or spec.flag.lstrip("-").replace("-", "_").upper()
        names = [spec.flag, *spec.meta.get("aliases", ())]
        if spec.meta.get("action") == "append":
            target.add_argument(*names, action=_AppendReplacingDefault, default=argparse.SUPPRESS, **kwargs)
        elif spec.base is bool:
            target.add_argument(*names, action=argparse.BooleanOptionalAction, default=spec.default, **kwargs)
        else:
            if spec.meta.get("choices") is not None:
                kwargs["choices"] = spec.meta["choices"]
            default = spec.default
            if spec.meta.get("required") and default is None:
                default = argparse.SUPPRESS  # no "(default: None)" in the help of a required setting
            if isinstance(default, (list, tuple)):  # shown as typed (and parsed back by argparse)
                default = ",".join(map(str, default))
            target.add_argument(*names, type=_argparse_type(spec), default=default, **kwargs)
    parser.set_defaults(_specs=all_specs, _cls=cls)
    return all_specs


class _AppendReplacingDefault(argparse.Action):
    """`--model a --model b`: a list; given on the command line it replaces the list a --config file
    set as the default (argparse's own append would add to it)."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = namespace.__dict__.setdefault("_appended", set())
        current = list(getattr(namespace, self.dest, None) or []) if self.dest in seen else []
        seen.add(self.dest)
        setattr(namespace, self.dest, current + [values])


def _argparse_type(spec: Spec):
    def convert(text: str):
        try:
            return spec.from_text(text)
        except (ValueError, TypeError) as exc:
            raise argparse.ArgumentTypeError(f"invalid value {text!r} ({exc})") from None

    convert.__name__ = getattr(spec.base, "__name__", "value")  # argparse names it in its message
    return convert


def join_dash_values(argv: list[str], flags: set[str], known: set[str]) -> list[str]:
    """`--mapping -,-,12` -> `--mapping=-,-,12` for the flags whose values may begin with '-' (argparse
    takes such a value for an option and says "expected one argument"); a known option after the
    flag is left alone (the flag's value is then missing, and argparse says so)."""
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        if token in flags and i + 1 < len(argv) and argv[i + 1].startswith("-") and argv[i + 1] not in known \
                and not argv[i + 1].startswith("--"):
            out.append(f"{token}={argv[i + 1]}")
            i += 2
            continue
        out.append(token)
        i += 1
    return out


def build(cls, values: dict, path: tuple[str, ...] = ()):
    """The dataclass from parsed values keyed by dest (nested dataclasses from their prefixed dests);
    fields fastkd sets itself keep their defaults."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        annotation = hints[f.name]
        if dataclasses.is_dataclass(annotation):
            kwargs[f.name] = build(annotation, values, path + ((_prefix(f),) if _prefix(f) else ()))
            continue
        dest = "_".join(path + (f.name,))
        if dest in values:
            value = values[dest]
            if isinstance(value, list) and _base_type(annotation) is tuple:
                value = tuple(value)
            kwargs[f.name] = value
    return cls(**kwargs)


def missing_required(specs_: list[Spec], values: dict) -> list[str]:
    return [s.flag for s in specs_ if s.meta.get("required") and values.get(s.dest) in (None, [], "")]


# --- config files -----------------------------------------------------------------------------------

def _parse_config_text(text: str, p: Path, where: str):
    """The file's data: YAML by its suffix (aliases refused), JSON otherwise."""
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.load(text, Loader=_no_alias_loader())  # noqa: S506 (a SafeLoader)
        except (_AliasRefused, _KeyGivenTwice) as exc:
            raise UserError(f"{where}: {exc}") from None
        except yaml.YAMLError as exc:
            first = " ".join(str(exc).split())[:160]
            raise UserError(f"{where}: not valid YAML ({first})") from None
    try:
        return json.loads(text, object_pairs_hook=_refuse_keys_given_twice)
    except _KeyGivenTwice as exc:
        raise UserError(f"{where}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: not valid JSON ({exc}); YAML files end in .yaml or .yml") from None


def read_config_file(path: str, command: str) -> dict:
    """A config file's settings (by dest, nested sections flattened), checked for the command."""
    p = Path(path)
    where = f"--config {path}"
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{where}: a directory; give a JSON or YAML file") from None
    except UnicodeDecodeError:
        raise UserError(f"{where}: not a text file (JSON or YAML)") from None
    except OSError as exc:  # unreadable: permissions, a disk error
        raise UserError(f"{where}: cannot be read ({exc.strerror or exc})") from None
    try:
        data = _parse_config_text(text, p, where)
    except RecursionError:  # "[[[[..." thousands deep: a hostile or broken file, never settings
        raise UserError(f"{where}: nested too deeply to be a settings file") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{where}: must hold a mapping of settings (key: value)")
    if "fastkd_version" in data and isinstance(data.get("config"), dict):
        # A run's own resolved config: its settings, checked to be this command's.
        written_by = data.get("command", "distill")
        if written_by != command:
            raise UserError(f"{where} is the resolved config of a fastkd {written_by} run: give it to "
                            f"`fastkd {written_by} --config`")
        data = data["config"]
    try:
        return _flatten(data, where)
    except RecursionError:
        raise UserError(f"{where}: nested too deeply to be a settings file") from None


class _AliasRefused(Exception):
    pass


class _KeyGivenTwice(Exception):
    pass


def _given_twice(key, lines: str = "") -> _KeyGivenTwice:
    # JSON and YAML parsers keep the last value of a repeated key without a word: the user meant one.
    return _KeyGivenTwice(f"{key} is given twice{lines}: keep one (the last would silently win)")


def _refuse_keys_given_twice(pairs: list[tuple]) -> dict:
    """json's object_pairs_hook: every object (nested sections too) as a dict, a repeated key refused."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise _given_twice(key)
        out[key] = value
    return out


def _no_alias_loader():
    """yaml's SafeLoader with aliases (*name) refused: a config file may come from someone else, and a
    few nested aliases expand to billions of keys (the "billion laughs" file) once read. Settings are
    flat values; nothing in them needs an alias."""
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                line = event.start_mark.line + 1 if event.start_mark else "?"
                raise _AliasRefused(f"YAML aliases (*{event.anchor}, line {line}) are not accepted in a config "
                                    "file: write each setting out")
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            # Every mapping, nested sections too; keys that are not scalars are yaml's own error.
            first_line = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # a merge key (<<) may override what it merges: YAML's rule, not a repeat
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in first_line:
                    raise _given_twice(key, f" (lines {first_line[key]} and {line})")
                first_line[key] = line
            return super().construct_mapping(node, deep)

    return NoAliasLoader


def _flatten(data: dict, where: str, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise UserError(f"{where}: setting names are strings (got {key!r})")
        name = prefix + key.replace("-", "_")
        items = _flatten(value, where, name + "_") if isinstance(value, dict) else {name: value}
        for flat, v in items.items():
            if flat in out:  # batch-size and batch_size, or proxy: {steps} and proxy_steps
                raise UserError(f"{where}: {flat} is given twice")
            out[flat] = v
    return out


def apply_config_file(parser: argparse.ArgumentParser, path: str, command: str) -> None:
    """The file's settings become the parser's defaults, so flags on the command line override them."""
    where = f"--config {path}"
    values = read_config_file(path, command)
    specs_ = parser.get_default("_specs")
    by_dest = {s.dest: s for s in specs_}
    # A setting may also be named as its flag says (proxy_seq_len for proxy.max_seq_len, proxy_chunk).
    by_dest.update({s.flag.lstrip("-").replace("-", "_"): s for s in specs_ if s.flag.lstrip("-").replace("-", "_")
                    not in by_dest})
    defaults, seen = {}, {}
    for dest, value in values.items():
        spec = by_dest.get(dest)
        if spec is None:
            close = difflib.get_close_matches(dest, list(by_dest), n=1)
            hint = f" (did you mean {close[0]}?)" if close else f" (fastkd {command} --help lists the settings)"
            raise UserError(f"{where}: unknown setting {dest!r} for fastkd {command}{hint}")
        if spec.dest in seen:
            raise UserError(f"{where}: {spec.dest} is given twice (as {seen[spec.dest]!r} and {dest!r})")
        seen[spec.dest] = dest
        if spec.meta.get("action") == "append":
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise UserError(f"{where}: {dest} must be a string or a list of strings (got {value!r})")
            defaults[spec.dest] = list(value)
        else:
            defaults[spec.dest] = spec.from_file(value, where)
    parser.set_defaults(**defaults)


def resolved_config(command: str, cfg) -> dict:
    """What a run writes as its resolved config, in the form `--config` reads back."""
    from . import __version__

    return {"fastkd_version": __version__, "command": command, "config": to_dict(cfg)}


def to_dict(cfg) -> dict:
    """The command-line settings of `cfg` (fields fastkd sets itself left out), JSON-ready: a nested
    dataclass as a section named by its prefix (merged into its parent when the prefix is empty)."""
    out = {}
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        if not f.metadata.get("cli", True):
            continue
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            if _prefix(f):
                out[_prefix(f)] = to_dict(value)
            else:
                out.update(to_dict(value))
        else:
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out
