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
import types
import typing

from .errors import UserError

MISSING = dataclasses.MISSING


# --- the vocabulary every command's settings share ------------------------------------------------

PROGRESS_HELP = "progress bars (--no-progress hides them)"

MAX_SEED = 2 ** 32 - 1  # numpy's legacy generator (np.random.seed, fastkd.rng) takes seeds in [0, 2**32 - 1]


def seed_problem(seed: int, what: str = "--seed") -> str | None:
    """Why `seed` cannot seed every generator, or None. Checked where a seed enters (the parser, a
    config file) and where one is derived from another (seed + k), before any work."""
    if seed < 0 or seed > MAX_SEED:
        return f"{what} {seed} is out of range: seeds are integers from 0 to {MAX_SEED} (numpy takes 32-bit seeds)"
    return None


def seed_value(text: str) -> int:
    """A seed: an integer in [0, 2**32 - 1] (numpy refuses others, and torch negative ones, after the
    work has begun)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}: give an integer from 0 to {MAX_SEED}") from None
    if seed_problem(value) is not None:
        raise argparse.ArgumentTypeError(f"invalid seed {value}: give an integer from 0 to {MAX_SEED}")
    return value


CORPUS_MODES = ("packed", "sentences", "lines")
CORPUS_MODE_HELP = ("packed: running text packed into sequences of exactly --max-seq-len tokens; sentences: one "
                    "sentence per sequence; lines: one line per sequence (both in length-bucketed batches; a "
                    "sentence or line longer than --max-seq-len is left out)")

REPORT_TO = ("none", "tensorboard")  # where training metrics go besides metrics.jsonl
BACKENDS = ("torch", "cpp", "triton", "cuda")  # the fused-loss backends (fastkd.ops), reference first
LOSS_BACKENDS = ("auto",) + BACKENDS
OBJECTIVES = ("tinybert", "minilm", "minilmv2", "sentence")
OBJECTIVE_HELP = ("what the student learns: tinybert (embedding, hidden-state and attention-score MSE), minilm "
                  "(attention-distribution and value-relation KL), minilmv2 (Q-Q, K-K and V-V relation KL), sentence "
                  "(the teacher pipeline's sentence embedding alone: sentence-transformers' layer reduction); the "
                  "--w-* weights override single terms (distill's --w-sentence adds the embedding to any objective)")
AUTO_OBJECTIVE_HELP = ("sentence for a teacher with a sentence-transformers pipeline (modules.json) and a student as "
                       "wide as it, tinybert otherwise")
RELATION_HEADS_HELP = ("relation heads R of the minilm/minilmv2 relation terms: each model's concatenated heads split "
                       "into R (default: the teacher's attention heads; MiniLMv2 uses more, e.g. 48 for base-size "
                       "teachers); R must divide both hidden sizes")
LOSS_BACKEND_HELP = ("loss kernels: torch (reference), cpp (CPU), triton or cuda (GPU); auto = the fastest present; a "
                     "missing one falls back with one log line (default: $FASTKD_LOSS_BACKEND or auto)")
def differing_settings(saved: dict, current: dict, ignored: frozenset = frozenset()) -> list[str]:
    """Settings that differ between a saved run and this one, but for the `ignored` ones (those that
    do not change what is computed): what a --resume refuses, each as 'name (saved X, now Y)'."""
    keys = sorted((set(saved) | set(current)) - ignored)
    return [f"{k} (saved {saved.get(k)!r}, now {current.get(k)!r})" for k in keys if saved.get(k) != current.get(k)]


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
