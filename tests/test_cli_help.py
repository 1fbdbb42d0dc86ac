"""Every subcommand and every flag says what it is for in `--help`."""

from __future__ import annotations

import argparse

from reembed.cli import build_parser


def _undocumented(parser: argparse.ArgumentParser, path: list[str]) -> list[str]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += _undocumented(sub, path + [name])
        elif not action.help and action.dest != "help":
            out.append(f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
    return out


def test_every_flag_has_help_text():
    assert _undocumented(build_parser(), ["reembed"]) == []
