"""Errors that end a command with one line and a chosen exit status (the CLI prints them)."""

from __future__ import annotations


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
