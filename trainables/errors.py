"""The project's small exception hierarchy.

Every error a user can fix is one of these. Only the CLI catches them: it prints the message as
one line and exits with status 2. Messages name the offending thing (field, file, key) and the fix.
"""


class StudyError(Exception):
    """Base class: a problem the user can fix, reported as one line."""


class ConfigError(StudyError):
    """A study file, trial config or command-line value is invalid."""


class DataError(StudyError):
    """A dataset, split list, image or cache is missing, malformed or inconsistent."""


class CheckpointError(StudyError):
    """A model checkpoint or adapter file cannot be loaded safely or does not fit the model."""
