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


class StudyFailed(StudyError):
    """Work that was set off correctly failed while it ran (not a problem with the inputs)."""


class TrialFailed(StudyFailed):
    """One trial failed; its MLflow run carries the error."""


class DivergenceError(TrialFailed):
    """A trial's loss became NaN or infinite: its config (usually the lr) cannot train.

    Retrying it would only diverge again, so the trial leaves a marker file (`DIVERGED`) in
    its run folder; the retry and the driver recognise the divergence by that marker."""


DIVERGED = "diverged.txt"


class ArmFailed(StudyFailed):
    """Every trial of an arm failed; the study goes on with its other arms."""


class TrackingUnavailable(StudyFailed):
    """MLflow could not be written; what was not written is kept in a backlog file."""
