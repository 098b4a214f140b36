"""The README is the front door: its commands must be the ones CI runs and the CLI accepts."""

from __future__ import annotations

import re
from pathlib import Path

from kdd_jax.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _setup_commands() -> list[str]:
    block = README.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    cmds = _setup_commands()
    assert len(cmds) == 2, cmds
    ci = (ROOT / ".ci" / "run").read_text()
    assert cmds[1] in ci.splitlines(), "README test command and .ci/run diverged"


def test_readme_main_command_parses():
    main_cmd = _setup_commands()[0].split("&&")[-1].split()
    assert main_cmd[0] == "kdd"
    build_parser().parse_args(main_cmd[1:])


def test_cli_reference_documents_every_option_of_every_command():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in commands.items():
        section = README.split(f"### `kdd {name}", 1)
        assert len(section) == 2, f"README has no section for kdd {name}"
        text = section[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
        for action in sub._actions:
            for opt in action.option_strings:
                if opt.startswith("--") and opt != "--help":
                    assert re.search(rf"`{re.escape(opt)}", text), f"kdd {name} {opt} missing from README"
