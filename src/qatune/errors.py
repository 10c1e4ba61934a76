"""Errors that end a command with one line and a chosen exit status (the CLI prints them).

Any other exception reaching the CLI is a bug in qatune and is shown with its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake the user can fix: a config key, a data record, a command-line option, a file or
    folder they named. The message names the place and the fix; the CLI prints it as one line and
    exits 2. A ValueError, so library callers (and tests) that catch ValueError keep working."""


class RunError(Exception):
    """A run ended for a reason the user can act on: the message says what and what to do."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class TrainingStopped(RunError):
    """SIGINT/SIGTERM: the step in flight finished and a checkpoint was written; exit 128+signum
    (130 for Ctrl-C, 143 for a cluster's SIGTERM), as a shell reports a signalled process."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message, 128 + signum)
        self.signum = signum


class MethodStop(RunError):
    """A method ended the run for a reason it states (an RL rollout whose KL to the reference left
    its band). The runtime writes a checkpoint of the steps completed before it, then ends with the
    message (exit 1)."""
