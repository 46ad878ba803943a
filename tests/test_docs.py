"""The docs site builds strictly (a broken link, anchor or page left out of the nav fails), its CLI
reference is generated from the parser `--help` prints, and the README stays a short front page."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_the_cli_reference_holds_every_flag_of_every_command(site):
    from fastkd.cli import COMMANDS, build_parser

    page = (site / "cli" / "index.html").read_text()
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert set(commands) == set(COMMANDS)
    for name, command in commands.items():
        assert f"fastkd {name}" in page
        for action in command._actions:
            if action.help == "==SUPPRESS==" or action.dest == "help":
                continue
            for flag in action.option_strings:
                if flag.startswith("--"):
                    assert f"<code>{flag}</code>" in page, (name, flag)


def test_the_readme_is_a_short_front_page_whose_doc_links_exist():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert "make test" in text and "make demo" in text
    linked = set(re.findall(r"\(?(docs/[\w./-]+\.md)", text))
    assert linked, "the README links the docs pages"
    missing = [path for path in linked if not (ROOT / path).is_file()]
    assert not missing, missing
    pages = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")}
    assert pages <= linked | {"docs/index.md"}, f"pages the README does not link: {sorted(pages - linked)}"


def test_every_command_line_in_the_readme_parses():
    """The README's examples are what a newcomer copies: each `fastkd ...` line must be a command line
    the parser takes (flags that exist, values they accept, nothing required left out)."""
    import shlex

    from fastkd.cli import parse_config

    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    commands = [line for line in lines if line.startswith("fastkd ")]
    assert len(commands) >= 5, commands
    for line in commands:
        argv = shlex.split(line.replace("[", "").replace("]", ""))[1:]
        command, cfg = parse_config(argv)
        assert command == argv[0] and cfg is not None, line
