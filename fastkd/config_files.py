"""`--config FILE`: a command's settings from a JSON or YAML file (by field name, flat or nested),
checked key by key against the command's config dataclass (fastkd.options) and applied as the
parser's defaults, so the flags on the command line override them."""

from __future__ import annotations

import argparse
import difflib
import json
from pathlib import Path

from .errors import UserError


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
