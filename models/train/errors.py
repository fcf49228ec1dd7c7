"""User-facing errors of the training companion (the CLI prints them in one line, exit status 2)."""

from edgefc.errors import EdgefcError


class TrainingError(EdgefcError):
    """Bad training options: unknown architecture, unusable teacher/init weights, bad --resume folder."""


class DataError(EdgefcError):
    """The training or curation data is missing, empty or unreadable."""
