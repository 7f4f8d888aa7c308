"""Errors meant for people.

A `UserError` carries a message that says what was wrong and what to do. The command line
prints it on one line and exits non-zero; a traceback is shown only with `--debug`.
"""


class UserError(Exception):
    """Bad input or an unusable environment: the user can fix it, the code is not at fault."""

    exit_code = 2


class TrainingDiverged(UserError):
    """A loss, a gradient or lambda became NaN or Inf."""

    exit_code = 3


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during a command, with what survived and what to do next."""

    def __init__(self, hint: str):
        super().__init__(hint)
        self.hint = hint
