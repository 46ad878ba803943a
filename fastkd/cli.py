"""`fastkd` command line. A user's mistake is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

from . import options
from .config_files import apply_config_file
from .errors import UserError
from .processes import Stopped, children_die_with_this_process, end_children, stop_signals_raise, stopped_in

# Offline machines: never let transformers/datasets phone home for things that are local.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; fastkd prints one line naming the fix."""

    def error(self, message):
        words = self.prog.split()  # "fastkd" or "fastkd distill"
        self.exit(2, f"{' '.join(words[:1] + words[1:][-1:])}: error: {message} (see --help)\n")


class _OneConfig(argparse.Action):
    """--config FILE, once: with two, argparse would keep the last and silently drop the first file's
    settings (fastkd does not merge files)."""

    def __call__(self, parser, namespace, values, option_string=None):
        earlier = getattr(namespace, self.dest, None)
        if earlier is not None:
            raise UserError(f"--config given twice ({earlier} and {values}): give one file (merge the two, or "
                            "give the other's settings as flags, which override the file)")
        setattr(namespace, self.dest, values)


def _add_config_flag(p) -> None:
    p.add_argument("--config", metavar="FILE", default=None, action=_OneConfig,
                   help="settings from a JSON or YAML (.yaml/.yml) file, by name (batch_size: 16; a section like "
                        "proxy: {steps: 50} for prefixed ones); flags given here override it; a run's own resolved "
                        "config (OUTPUT/config.json, OUTPUT/<command>-config.json) is such a file")


def _config(args):
    """The command's config dataclass from the parsed flags (over --config's values over defaults)."""
    values = vars(args)
    missing = options.missing_required(args._specs, values)
    if missing:
        raise UserError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required: give "
                        f"{'it' if len(missing) == 1 else 'them'} on the command line or in --config FILE")
    return options.build(args._cls, values)


def _command_config(args):
    """The config a command runs with, checked (its validate()) before anything heavy is imported: a
    mistaken value is one line in well under a second, not after torch and transformers load. Then
    the libraries' own chatter is turned down, as they are about to be imported anyway."""
    cfg = _config(args)
    if hasattr(cfg, "validate"):
        cfg.validate()
    _quiet_libraries()
    return cfg


def _quiet_libraries() -> None:
    for noisy in ("transformers", "datasets", "httpx", "huggingface_hub", "filelock", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # weight-loading bars; fastkd's own bars stay
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # offline retries would otherwise print a dozen lines


@dataclass(frozen=True)
class Command:
    """One `fastkd` command: its parser's words, where its config dataclass lives (imported only when the
    parser is built: a light module, no torch), and what runs it with that config, checked."""

    name: str
    help: str
    description: str
    config: Callable[[], tuple[type, dict | None]]  # -> (config dataclass, flag groups)
    run: Callable[[Any, argparse.Namespace], int]  # (the command's config, the parsed flags) -> exit code
    after_stop: str  # what a run stopped by a signal keeps, and how the user goes on
    local_rank: str | None = None  # the help of --local_rank (None: not a flag of this command)


def _distill(cfg, args) -> int:
    from .distill import run_distill

    if cfg.deepspeed is not None and args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))  # the deepspeed launcher passes it
    student_dir = run_distill(cfg)
    if cfg.deepspeed is not None and int(os.environ.get("RANK", "0")) != 0:
        return 0  # the main rank says what was done
    if student_dir is None:
        print(f"stopped at step {cfg.stop_at_step}; continue with: fastkd distill ... --output {cfg.output} --resume")
    else:
        import json

        info = json.loads((student_dir / "fastkd.json").read_text())
        print(_distilled_summary(info))
        print(f"student exported to {student_dir} (load with transformers.AutoModel.from_pretrained)")
    return 0


def _distilled_summary(info: dict) -> str:
    """What a finished distillation did, in one line: its steps, the skipped ones, and which steps the
    final losses are the mean of (after skipped steps, not the last ones)."""
    losses = ", ".join(f"{k} {v:.4f}" for k, v in info["final_losses"].items())
    first, last = info.get("final_losses_steps") or (None, None)
    window = "the last window" if last is None else f"steps {first}-{last}" if first != last else f"step {last}"
    skipped = info.get("skipped_steps", 0)
    return (f"distilled {info['steps']} steps in {info['seconds']:.0f} s with mapping {info['mapping']}"
            + (f"; {skipped} skipped as non-finite" if skipped else "")
            + (f"; final losses (mean of {window}): {losses}" if losses else "; no finite loss to report"))


def _glue(cfg, args) -> int:
    from .glue.report import markdown
    from .glue.run import run_glue

    report = run_glue(cfg, resolved=options.resolved_config("glue", cfg))
    print(markdown(report))
    print(f"wrote {cfg.output}/glue.json and {cfg.output}/glue.md")
    return 0


def _search(cfg, args) -> int:
    from .search.report import verdict_lines
    from .search.run import Search

    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    search = Search(cfg)
    result = search.run()
    if search.comm.is_main:
        print("\n".join(verdict_lines(result)))
        print(f"wrote {cfg.output}/best_mapping.json, report.md, fitness.png, layers.png, ladder.png, verdict.png")
    return 0


def _demo(cfg, args) -> int:
    from .demo import run_demo

    if cfg.data_dir is None:
        shared = os.path.join("..", "shared", "data")
        if not os.path.isdir(shared):
            raise UserError("no data found at ../shared/data: pass --data-dir DIR with corpus/ and glue/ inside")
        cfg.data_dir = shared
    summary = run_demo(cfg, resolved=options.resolved_config("demo", cfg))
    print("\n".join(summary["verdict"]))
    print()
    print(summary["glue_table"])
    sub = "quick" if cfg.quick else "full"
    print(f"demo outputs in {cfg.output}/{sub}: search/report.md, distill-*/student, glue/glue.md")
    return 0


def _bench(cfg, args) -> int:
    from .io import atomic_write_json
    from .rundir import check_writable_file

    check_writable_file(cfg.output)  # before the models are loaded and timed, not after
    from .bench import markdown, run_bench

    result = run_bench(cfg)
    env = result["environment"]
    print(f"{env.get('gpu') or env['cpu']}, torch {env['torch']}, {env['threads']} threads; "
          f"batch {cfg.batch_size} x {cfg.seq_len} tokens, {'bf16' if cfg.bf16 else 'fp32'}, "
          f"median of {cfg.steps} steps")
    print(markdown(result))
    for name, why in result["missing"].items():
        print(f"not measured: {name}: {why}")
    atomic_write_json(cfg.output, result)
    print(f"wrote {cfg.output}")
    return 0


def _distill_config():
    from .config import DISTILL_GROUPS, DistillConfig

    return DistillConfig, DISTILL_GROUPS


def _glue_config():
    from .glue.config import GlueConfig

    return GlueConfig, None


def _search_config():
    from .search.config import SEARCH_GROUPS, SearchConfig

    return SearchConfig, SEARCH_GROUPS


def _demo_config():
    from .config import DemoConfig

    return DemoConfig, None


def _bench_config():
    from .config import BenchConfig

    return BenchConfig, None


COMMANDS: dict[str, Command] = {c.name: c for c in (
    Command("distill", "distill a teacher into a smaller student with a given layer mapping",
            "Task-agnostic distillation on a text corpus: the student learns the teacher's sentence "
            "embedding (a sentence-transformers teacher, by default on one sentence per sequence) or, "
            "layer by layer, its embedding output, hidden states and attention of the mapped layers. "
            "Writes OUTPUT/config.json (the resolved settings: --config OUTPUT/config.json reruns it), "
            "metrics.jsonl, checkpoints/ and the exported OUTPUT/student/.",
            _distill_config, _distill, "every finished checkpoint is kept; continue with --resume",
            local_rank=argparse.SUPPRESS),
    Command("glue", "fine-tune and evaluate models on GLUE tasks (official metrics, one table)",
            "Fine-tunes each --model on each task's train set (or a deterministic subsample) and scores it "
            "on dev with the official metrics. Writes OUTPUT/glue.json (every metric, task score, "
            "majority-class baseline, predicted-label distribution, examples, seconds), OUTPUT/glue.md and "
            "the resolved settings OUTPUT/glue-config.json.",
            _glue_config, _glue, "every finished (model, task) result is kept; continue with --resume"),
    Command("search", "search the best layer mapping with a genetic algorithm in a cheap proxy setting",
            "Each candidate mapping is distilled briefly on a sample of the corpus (a whole generation shares "
            "one teacher forward per batch) and scored on the cheapest rung of a fidelity ladder (zeroshot: "
            "STS-B similarity with no training; probe: frozen features; short and full: proxy GLUE "
            "fine-tuning). The best fraction of each rung climbs "
            "to the next; the best on the top rung is the winner. The winner, uniform and last are then "
            "evaluated on held-out verdict seeds, and the report gives the paired difference with a 95% "
            "interval and a plain verdict. Writes best_mapping.json, report.md, fitness.png, layers.png, "
            "ladder.png, verdict.png, the store search.sqlite and the resolved settings search-config.json.",
            _search_config, _search, "every finished evaluation is kept; continue with --resume",
            local_rank="set by the deepspeed launcher (torchrun sets LOCAL_RANK instead); ranks split each "
                       "generation"),
    Command("demo", "the whole pipeline: search, distill the winner and the heuristics, GLUE table",
            "Searches the layer mapping for a 3-layer student of the default teacher, distills with the "
            "winner and with uniform and last on the corpus, then fine-tunes the students and the teacher "
            "with several seeds and prints the search's paired verdict (95% interval) and one table "
            "(mean ± SD over seeds, official dev sets). "
            "Interrupted? Run it again: every stage resumes.",
            _demo_config, _demo, "every finished stage is kept; run the same fastkd demo command again"),
    Command("bench", "distillation-step throughput and memory of each loss backend on this machine",
            "Times whole distillation steps (teacher forward, student forward, losses, backward, AdamW) "
            "after a warm-up, for each loss backend present (torch reference, cpp, triton, cuda), with fresh "
            "identical students, and prints sequences/s, tokens/s, peak extra memory and the ratios to the "
            "torch reference. Writes the table and the device, library versions and settings as JSON.",
            _bench_config, _bench, "nothing was written; run it again"),
)}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="fastkd",
        description="fastkd compresses BERT-family encoders by task-agnostic layer-wise knowledge distillation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # `deepspeed $(which fastkd) distill ...` puts --local_rank=N before the command (a subcommand's
    # own default would overwrite the same dest, hence another name).
    parser.add_argument("--local_rank", "--local-rank", dest="launcher_local_rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser, metavar="COMMAND")
    for command in COMMANDS.values():
        p = sub.add_parser(command.name, help=command.help, description=command.description,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        _add_config_flag(p)
        cls, groups = command.config()
        options.add_options(p, cls, groups)
        if command.local_rank is not None:
            p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=command.local_rank)
    return parser


def _dash_values_joined(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Values that may begin with '-' (--mapping -,-,12) joined to their flag, for every command."""
    commands = parser._subparsers._group_actions[0].choices
    flags, known = set(), set(parser._option_string_actions)
    for command_parser in commands.values():
        known |= set(command_parser._option_string_actions)
        for spec in command_parser.get_default("_specs") or []:
            if spec.meta.get("dash_value"):
                flags |= {spec.flag, *spec.meta.get("aliases", ())}
    return options.join_dash_values(argv, flags, known)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line, --config FILE's settings under the flags given."""
    parser = build_parser()
    argv = _dash_values_joined(parser, list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    path = getattr(args, "config", None)
    if path is not None:
        command_parser = parser._subparsers._group_actions[0].choices[args.command]
        apply_config_file(command_parser, path, args.command)
        args = parser.parse_args(argv)  # flags on the command line now override the file's values
    return args


def parse_config(argv: list[str]):
    """(command, its config dataclass) for a command line, as the command would run it."""
    args = parse(argv)
    return args.command, _config(args)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(argv)
    except UserError as exc:  # a bad --config file
        command = next((a for a in (argv if argv is not None else sys.argv[1:]) if a in COMMANDS), "fastkd")
        print(f"fastkd {command}: error: {exc}", file=sys.stderr)
        return 2
    if args.launcher_local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.launcher_local_rank))
    from .rundir import end_of_command

    children_die_with_this_process()  # no tokenizing worker outlives a killed fastkd
    code = 1
    try:
        with stop_signals_raise():  # a scheduler's SIGTERM outside the training loop still ends in one line
            code = _run(args)
    finally:
        end_of_command(failed=code != 0)  # a refused run leaves no output folder holding only its lock
    return code


def _say_stopped(command: str, stopped: Stopped) -> int:
    from .rundir import made_nothing_yet

    end_children()
    kept = "nothing was written yet; run the same command again" if made_nothing_yet() else \
        COMMANDS[command].after_stop if command in COMMANDS else "run it again"
    print(f"fastkd {command}: stopped by {stopped.name}: {kept}", file=sys.stderr)
    return 128 + stopped.signum


def _run(args) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return COMMANDS[args.command].run(_command_config(args), args)
    except UserError as exc:
        print(f"fastkd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from .io import is_full_disk
        from .training import Preempted

        stopped = stopped_in(exc)  # (a library's cleanup may raise its own error on the way out)
        if stopped is not None:
            return _say_stopped(args.command, stopped)

        if is_full_disk(exc):  # a writer no `no_space_is_one_line` wraps: the OS's, SQLite's words
            filename = getattr(exc, "filename", None)
            where = f" writing {filename}" if filename else ""
            again = {"bench": "run it again", "demo": "run the same command again"}.get(args.command, "--resume")
            print(f"fastkd {args.command}: error: no space left on device{where}: free some space and {again}",
                  file=sys.stderr)
            return 2
        if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:  # any path a user gave, wherever used
            name = str(exc.filename or "")
            print(f"fastkd {args.command}: error: a path is longer than the file system takes "
                  f"({name[:60]}{'...' if len(name) > 60 else ''}): give a shorter one", file=sys.stderr)
            return 2
        if isinstance(exc, Preempted):
            if args.command == "demo":
                exc.resume_hint = "run the same fastkd demo command again: every finished stage is reused"
            print(f"fastkd {args.command}: {exc}", file=sys.stderr)
            return 128 + int(exc.signum)
        raise
    except Stopped as exc:
        return _say_stopped(args.command, exc)
    except KeyboardInterrupt:
        print(f"fastkd {args.command}: interrupted; continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
