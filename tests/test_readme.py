"""The README's promises about how to run things stay true."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    return re.findall(r"```sh\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_readme_starts_with_exactly_two_setup_commands_run_then_test():
    run, test = readme_commands()[:2]
    assert run.endswith("python run.py")
    assert test.endswith("python -m pytest")
    assert "requirements.txt" in run
    assert "requirements.txt" in test


def test_ci_runs_the_readme_test_command_verbatim():
    test = readme_commands()[1]
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci_lines
