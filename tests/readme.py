"""The README's `bash` blocks as commands the tests run: parsing, classification, tiny budgets.

Every ```bash block of README.md is preceded by one marker line saying who runs it:
`<!-- readme-test: embedded -->` (tests/integration/test_readme.py, no services, no network),
`<!-- readme-test: stack -->` (tests/integration/test_stack.py, with the stack's environment) or
`<!-- readme-test: not run: <why> -->`. A block without a marker fails the tests, so a new
command cannot slip past them.
"""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

MARKER = re.compile(r"^<!-- readme-test: (?P<kind>embedded|stack|not run: \S.*?) -->$")
RUNNER = re.compile(r"^(?:python -m studies\.run|make run)(?:\s|$)")
TINY_TRIALS = 2  # finished trials for a command that names no budget
TINY_EPOCHS = 2


@dataclass(frozen=True)
class Command:
    line: int  # 1-based line of README.md where it starts
    text: str  # continuation lines joined, as bash reads it


@dataclass(frozen=True)
class Block:
    kind: str  # embedded | stack | not run: ...
    line: int
    commands: tuple[Command, ...]


def readme_blocks(path: Path) -> list[Block]:
    """Every ```bash block with its marker; raises ValueError naming a block without one."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() != "```bash":
            i += 1
            continue
        start = i + 1
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(before)
        if marker is None:
            raise ValueError(f"{path.name}:{start}: a ```bash block needs a `<!-- readme-test: embedded|stack|not run: WHY -->` "
                             f"line above it, got {before!r}")
        commands, pending, pending_line = [], "", 0
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            text = lines[i].rstrip()
            if not pending:
                pending_line = i + 1
            if text.endswith("\\"):
                pending += text[:-1].rstrip() + " "
            else:
                pending += text.strip() if pending else text
                if pending.strip() and not pending.lstrip().startswith("#"):
                    commands.append(Command(pending_line, pending.strip()))
                pending = ""
            i += 1
        blocks.append(Block(marker["kind"], start, tuple(commands)))
        i += 1
    return blocks


def split_comment(command: str) -> tuple[str, str]:
    """(the command, its trailing `# comment` or ''), quotes respected."""
    quote = None
    for k, ch in enumerate(command):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (k == 0 or command[k - 1].isspace()):
            return command[:k].rstrip(), command[k:]
    return command, ""


def with_tiny_budget(command: str) -> str:
    """A runner command (`python -m studies.run`, `make run`) with its budget cut through its own
    flags: `--n-trials N` becomes ceil(N/10) (so a command that extends a study still extends
    it), a command without one gets --n-trials 2; every one trains for 2 epochs."""
    if not RUNNER.match(command):
        return command
    body, comment = split_comment(command)
    words = shlex.split(body)
    if "--n-trials" in words:
        k = words.index("--n-trials") + 1
        words[k] = str(max(1, math.ceil(int(words[k]) / 10)))
    else:
        words += ["--n-trials", str(TINY_TRIALS)]
    words += ["--set", f"training.epochs={TINY_EPOCHS}"]
    if words[:2] == ["make", "run"]:
        words = ["make", "run", "ARGS=" + shlex.join(words[2:])]
    return shlex.join(words) + (f"  {comment}" if comment else "")


def script(blocks: list[Block], *, readme: str = "README.md") -> str:
    """One bash script running the blocks' commands in order (tiny budgets), stopping at the first
    that fails and saying which README line it came from; background jobs are stopped at exit."""
    out = ["set -euo pipefail",
           "trap 'status=$?; echo \"README command failed (exit $status): $BASH_COMMAND\" >&2' ERR",
           "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT"]
    for block in blocks:
        for command in block.commands:
            text = with_tiny_budget(command.text)
            out.append(f"echo {shlex.quote(f'+ {readme}:{command.line}: {text}')}")
            out.append(text)
    return "\n".join(out) + "\n"
