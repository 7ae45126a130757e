"""The project's root error, its kinds, and the exit code each kind maps to.

`models` is the lowest layer that serving and studies both import, so the root lives here and
imports nothing. `search_spaces` stands apart (it may import neither models nor studies): its
`SpaceError` is turned into a `ConfigError` by the study loader, the one place that reads a space
for a user.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum


class ExitCode(IntEnum):
    """What every command (`python -m studies.*`, `python -m serving*`) returns."""

    OK = 0
    FAILURE = 1  # a runtime failure: a service is down, too many failed trials, no winner
    USAGE = 2  # a user mistake: a config key, a flag, a file
    INVALID_ROWS = 3  # batch scoring finished, but some rows could not be scored
    INTERRUPTED = 130  # SIGINT (Ctrl-C)
    TERMINATED = 143  # SIGTERM


class WorkbenchError(Exception):
    """Root of the errors this project raises on purpose; the command prints the message, no traceback."""

    exit_code: ExitCode = ExitCode.FAILURE


class ConfigError(WorkbenchError):
    """One or more user mistakes in a file: each is `<file>: <key path>: <message>`."""

    exit_code = ExitCode.USAGE

    def __init__(self, source: str, problems: Sequence[tuple[str, str]]) -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__(str(self))

    @classmethod
    def single(cls, source: str, path: str, message: str) -> ConfigError:
        return cls(source, [(path, message)])

    def __str__(self) -> str:
        return render_problems(self.source, self.problems)


def render_problems(source: str, problems: Sequence[tuple[str, str]]) -> str:
    """`<file>: <key path>: <message>`, one line per problem."""
    return "\n".join(f"{source}: {path}: {message}" if path else f"{source}: {message}" for path, message in problems)
