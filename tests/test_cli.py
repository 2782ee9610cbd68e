"""The ``spectral-monitor`` command line: help, version, unknown commands, summary errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from spectral_monitor import __version__
from spectral_monitor.cli import main


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and __version__ in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("demo", "summary", "report", "compare", "wandb-workspace"):
        assert command in out
    assert main([]) == 2


def test_an_unknown_command_says_so(capsys):
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2 and "invalid choice: 'frobnicate'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["summary", "report", "compare"])
def test_every_command_has_its_own_help(capsys, command):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0 and f"spectral-monitor {command}" in capsys.readouterr().out


def test_summary_of_a_missing_a_non_jsonl_and_an_empty_path(tmp_path, capsys):
    assert main(["summary", str(tmp_path / "nope.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("this is not json\nneither is this\n")
    assert main(["summary", str(bad)]) == 2
    assert "bad.jsonl" in capsys.readouterr().err
    assert main(["summary", str(tmp_path)]) == 2  # a folder without a log
    assert "spectral-monitor summary: error:" in capsys.readouterr().err


def test_the_console_script_is_installed():
    out = subprocess.run(
        [sys.executable, "-m", "spectral_monitor", "--version"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0 and __version__ in out.stdout
