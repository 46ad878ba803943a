"""mkdocs hook: docs/cli.md's `<!-- commands -->` becomes the reference of every `fastkd` command, rendered
from the parser `fastkd --help` prints (built from the config dataclasses), so the page cannot go stale."""

from __future__ import annotations

import argparse

MARKER = "<!-- commands -->"


def _cell(text: str) -> str:
    """One table cell: one line, its pipes escaped, and no `<word>` read as an HTML tag."""
    return " ".join(str(text).split()).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _default(action: argparse.Action) -> str:
    if action.default in (None, argparse.SUPPRESS) or isinstance(action, argparse._StoreTrueAction) and not action.default:
        return ""
    if isinstance(action.default, bool):
        return "on" if action.default else "off"
    return f"`{_cell(action.default)}`"


def _flag(action: argparse.Action) -> str:
    flags = ", ".join(f"`{f}`" for f in action.option_strings)
    if action.nargs != 0 and action.option_strings:
        flags += f" *{action.metavar or action.dest.upper()}*"
    return flags


def command_reference(parser: argparse.ArgumentParser) -> str:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in sub._choices_actions}
    lines = []
    for name, command in sub.choices.items():
        lines += [f"## fastkd {name}", "", _cell(helps.get(name, "")) + ".", "", _cell(command.description or ""), "",
                  f"```\n{command.format_usage().strip()}\n```", ""]
        for group in command._action_groups:
            shown = [a for a in group._group_actions if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]
            if not shown:
                continue
            title = group.title if group.title not in ("options", "optional arguments") else "options"
            lines += [f"### {name}: {title}", "", "| flag | default | what it sets |", "| --- | --- | --- |"]
            lines += [f"| {_flag(a)} | {_default(a)} | {_cell(a.help or '')} |" for a in shown]
            lines.append("")
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    from fastkd.cli import build_parser

    return markdown.replace(MARKER, command_reference(build_parser()))
