"""Help everywhere (issue 13): every option of every command has help text that shows its default, and all
five commands answer --version."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from edge_daemon.bench.cli import build_parser as bench_parser
from edge_daemon.cli import build_parser as daemon_parser
from edge_inspect.cli import build_parser as inspect_parser
from engines.cli import build_parser as engines_parser
from engines.cli_common import DefaultsFormatter, version
from trainer.cli import build_parser as trainer_parser

PARSERS = {"edge-train": trainer_parser, "edge-engines": engines_parser, "edge-daemon": daemon_parser,
           "edge-bench": bench_parser, "edge-inspect": inspect_parser}
INTERNAL = {("edge-daemon", "child")}  # started by the supervisor, hidden from --help


def _commands(prog: str, parser: argparse.ArgumentParser):
    """(name, parser) of the command and every sub-command, recursively."""
    yield prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if (prog.split()[0], name) not in INTERNAL:
                    yield from _commands(f"{prog} {name}", sub)


def _options():
    for prog, build in PARSERS.items():
        for name, parser in _commands(prog, build()):
            for action in parser._actions:
                if action.option_strings and not isinstance(action, argparse._HelpAction):
                    yield pytest.param(parser, action, id=f"{name} {action.option_strings[-1]}")


@pytest.mark.parametrize("parser, action", list(_options()))
def test_every_option_has_help_showing_its_default(parser, action):
    assert action.help and action.help != argparse.SUPPRESS, "no help text"
    assert issubclass(parser.formatter_class, DefaultsFormatter), parser.formatter_class
    default = action.default
    if default in (None, False, [], argparse.SUPPRESS) or isinstance(action, argparse._VersionAction):
        return
    shown = DefaultsFormatter(parser.prog)._get_help_string(action) % {"default": default}
    assert "default" in shown.lower(), shown
    if "default" not in action.help.lower():  # the formatter appended it: the value itself is shown
        text = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        assert f"(default: {text})" in shown, shown


@pytest.mark.parametrize("prog", sorted(PARSERS))
def test_version_on_all_five(prog, capsys):
    with pytest.raises(SystemExit) as info:
        PARSERS[prog]().parse_args(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"{prog} {version()}"


def test_help_renders_for_every_command():
    for prog, build in PARSERS.items():
        for name, parser in _commands(prog, build()):
            text = parser.format_help()
            assert "==SUPPRESS==" not in text and name.split()[-1] in text, name


def test_installed_scripts_answer_version():
    for prog in PARSERS:
        out = subprocess.run([sys.executable, "-c", f"import sys; sys.argv[0] = {prog!r}; "
                              f"from importlib.metadata import entry_points; "
                              f"sys.exit(entry_points(group='console_scripts')[{prog!r}].load()(['--version']))"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.startswith(prog), (prog, out.stderr)
