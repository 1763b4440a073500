"""The errors scribeline raises for bad input and failed storage.

Every message is a sentence that names the bad value and the fix. The CLI prints
``str(err)`` on one line and exits with status 2.
"""


class ScribelineError(Exception):
    """Base class: a problem the user can fix (bad input, settings, storage)."""


class GlyphSourceError(ScribelineError, ValueError):
    """An EMNIST file or mapping is missing, malformed or inconsistent."""


class CorpusError(ScribelineError, ValueError):
    """A corpus is empty, unreadable, or nothing in it survives cleaning."""


class SettingsError(ScribelineError, ValueError):
    """Settings that cannot work together."""


class DatasetError(ScribelineError):
    """A dataset version is missing, damaged, or not the one expected."""


class StorageError(ScribelineError, OSError):
    """An output or input URL cannot be read or written."""
