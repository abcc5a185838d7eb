"""One small exception hierarchy; the server maps these classes to HTTP status codes."""


class MiniCPMVError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidInputError(MiniCPMVError, ValueError):
    """The caller sent something we cannot use (a bad message, option or media file)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param  # the request field at fault, when there is one


class ImageError(InvalidInputError):
    """An image could not be read, is empty, or is larger than the configured pixel limit."""


class VideoError(InvalidInputError):
    """A video could not be opened or decoded, has no video stream or no frames, or its frames are too large."""


class CheckpointError(MiniCPMVError):
    """A checkpoint is missing, incomplete, corrupt or of an unsupported kind."""


class ContextLengthError(InvalidInputError):
    """A prompt (plus the requested output) does not fit the model's context."""


class QueueFullError(MiniCPMVError):
    """The engine's waiting queue is full; the request was not accepted."""


class EngineClosedError(MiniCPMVError):
    """The engine was shut down (the server is stopping); the request did not finish."""
