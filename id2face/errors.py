"""Errors that mean "the user asked for something that cannot be done": the CLI prints their
message on one line and exits non-zero; anything else is a bug and keeps its traceback."""


def one_line(err: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, at most ``limit`` characters (for logs and sidecars)."""
    return " ".join(str(err).split())[:limit]


def describe(err: BaseException) -> str:
    """``TypeName: message`` on one line (the type alone if the message is empty)."""
    text = one_line(err)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class UserError(Exception):
    """Bad input, a missing file, an impossible request."""


class MissingWeightsError(UserError, FileNotFoundError):
    """A pretrained weights file named in the config does not exist."""

    def __init__(self, what: str, path, source: str):
        super().__init__(
            f"{what} weights not found at {path!s}: set the path in the config; such weights come from {source}"
        )


class UntrainedWeightsWarning(UserWarning):
    """A frozen role was built with an untrained init because no weights file was given: fine for
    tests, or when a checkpoint's state is loaded over it afterwards."""
