"""The package's exception hierarchy; the API maps each class to one HTTP status code."""


class SynthgenError(Exception):
    """Base class of every error synthgen raises on purpose."""


class InvalidInputError(SynthgenError, ValueError):
    """A request, argument or file from outside is malformed; the message says what to fix."""


class DataError(InvalidInputError):
    """A dataset could not be read: wrong format, truncated, inconsistent labels."""


class CheckpointError(SynthgenError):
    """A checkpoint folder is missing, corrupt, truncated or does not match its config."""


class NotFoundError(SynthgenError, LookupError):
    """A named thing (model, class, job) does not exist."""
