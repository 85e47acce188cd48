"""The command line imports only what the invoked command needs: help and the broker commands
start without torch or faiss (each a few seconds of import and hundreds of MB)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "faiss", "faust", "aiohttp")


def _imported_after(argv: list[str]) -> list[str]:
    """Heavy modules in sys.modules after parsing ``argv`` (and running it for ``--help``), in
    a fresh interpreter."""
    code = ("import sys, json, cli.main as c\n"
            f"argv = {argv!r}\n"
            "try:\n"
            "    c.build_parser(argv).parse_args(argv)\n"
            "except SystemExit:\n"
            "    pass\n"
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"], ["broker", "status"], ["--log-level", "debug", "broker", "stop", "--port", "9"],
                                  ["bench", "--help"]])
def test_light_commands_import_no_heavy_module(argv):
    assert _imported_after(argv) == []


def test_the_invoked_command_still_gets_its_arguments():
    """The lazy parser is not a stub: the invoked command's module is imported and its options
    parse (eval's come from SoftQConfig, so torch is loaded there)."""
    from cli.main import build_parser

    args = build_parser(["eval", "--vote-prior", "3"]).parse_args(["eval", "--vote-prior", "3"])
    assert args.vote_prior == 3.0 and args.module == "evaluation.cli"
    assert "torch" in _imported_after(["eval", "--source", "synthetic"])


def test_a_child_started_without_the_memento_command_takes_the_log_level_from_the_environment(monkeypatch):
    """Benches and tests start serving and the stream worker as ``python -m ...`` children with
    MEMENTO_LOG_LEVEL set; before, those children logged at INFO whatever it said."""
    import argparse

    from memento.options import log_level

    monkeypatch.setenv("MEMENTO_LOG_LEVEL", "warning")
    assert log_level(argparse.Namespace()) == "WARNING"          # python -m serving.cli: no --log-level
    assert log_level(argparse.Namespace(log_level="ERROR")) == "ERROR"
    monkeypatch.delenv("MEMENTO_LOG_LEVEL")
    assert log_level() == "INFO"
