"""Errors that mean "the user asked for something that cannot be done": the CLI prints their
message on one line and exits non-zero; anything else is a bug and keeps its traceback."""


def one_line(err: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, at most ``limit`` characters (for logs and sidecars)."""
    return " ".join(str(err).split())[:limit]


def describe(err: BaseException) -> str:
    """``TypeName: message`` on one line (the type alone if the message is empty)."""
    text = one_line(err)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def user_message(err: BaseException) -> str:
    """What the CLI prints of a ``UserError``. One raised in a DataLoader worker comes back as the
    same type whose message is torch's "Caught X in DataLoader worker process N. Original
    Traceback ...": its last line holds the original message."""
    text = str(err)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


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
