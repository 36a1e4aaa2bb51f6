"""The package's exception hierarchy. It knows nothing of HTTP: `app.api.errors` maps each class to a status."""


class SynthgenError(Exception):
    """Base class of every error synthgen raises on purpose."""


class InvalidInputError(SynthgenError, ValueError):
    """A request, argument or file from outside is malformed; the message says what to fix."""


class DataError(InvalidInputError):
    """A dataset could not be read: wrong format, truncated, inconsistent labels."""


class CheckpointError(SynthgenError):
    """A checkpoint folder is missing, corrupt, truncated or does not match its config."""


class SchemaError(SynthgenError):
    """The jobs database's schema is not the one this version uses."""


class NotFoundError(SynthgenError, LookupError):
    """A named thing (model, class, job) does not exist."""


class ConflictError(SynthgenError):
    """The request is valid but does not fit the thing's state (e.g. reconstruct on a GAN, a model not loaded)."""


class OverloadedError(SynthgenError):
    """The queue is full; the client should retry after `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RateLimitedError(OverloadedError):
    """The caller sent more requests than its rate limit allows (HTTP 429 with Retry-After)."""


class RequestTimeoutError(SynthgenError):
    """The request waited longer than its timeout; its samples left the queue."""


class ModelFailureError(SynthgenError):
    """A forward pass failed; only the requests of that batch are affected."""


class AuthError(SynthgenError):
    """The caller is not allowed in."""


class MissingApiKeyError(AuthError):
    """No API key was sent, and the server needs one."""


class InvalidApiKeyError(AuthError):
    """The API key sent is not one the server knows."""


class ClientDisconnectedError(SynthgenError):
    """The client closed the connection before the answer was ready; its work was cancelled."""


class UnsupportedMediaTypeError(InvalidInputError):
    """The body's content type is not the one the route reads."""


class PayloadTooLargeError(InvalidInputError):
    """The body is over the configured limit."""


class RangeNotSatisfiableError(InvalidInputError):
    """A download asked for a byte range outside the file (HTTP 416, with the file's `size`)."""

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message)
        self.size = size


class SlowRequestError(InvalidInputError):
    """The client did not send its whole body within the body timeout (HTTP 408)."""


class ForbiddenError(AuthError):
    """The API key is valid but its role does not allow this operation."""


class ModelUnavailableError(ConflictError):
    """The model was unloaded while work waited for it."""


class QuotaExceededError(SynthgenError):
    """The jobs' disk quota would be exceeded (HTTP 507)."""


class QualityGateError(SynthgenError):
    """A trained model failed the quality gates its training was given, so it was not promoted."""
