"""Errors a user can act on. The CLI prints them as one line instead of a traceback."""

from __future__ import annotations


class FromfaceError(Exception):
    """Base class: the message says what went wrong and, where possible, what to do."""


class ImageError(FromfaceError):
    """An image could not be read or is unusable; names the file and the problem."""

    def __init__(self, source: object, problem: str):
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


class NoFaceError(FromfaceError):
    """No face was found where one was required."""


class DataError(FromfaceError):
    """A dataset, pair list or manifest is missing or malformed."""


class ConfigError(FromfaceError):
    """A model name, config key or checkpoint does not fit."""


class AlreadyEnrolledError(DataError):
    """An enrolment under a name that is already in the gallery, without asking to add to it."""
