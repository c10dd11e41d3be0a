"""The durable record queue on its own (no MLflow): order, retries, nothing lost, picklable."""

from __future__ import annotations

import pickle

import pytest

from contract import errors
from study.backlog import Backlog


class Flaky:
    """Applies records into a list; raises a transient error while `down` is set."""

    def __init__(self) -> None:
        self.applied: list[int] = []
        self.down = False

    def __call__(self, record) -> None:
        if self.down:
            raise ConnectionError("away")
        self.applied.append(record["n"])


def test_records_apply_in_order_and_wait_while_the_target_is_away(tmp_path, capsys):
    target = Flaky()
    queue = Backlog(tmp_path / "q.jsonl", target, (ConnectionError,), background=False)
    queue.put({"n": 1})
    target.down = True
    queue.put({"n": 2})
    queue.put({"n": 3})
    assert target.applied == [1] and [r["n"] for r in queue.pending()] == [2, 3]
    assert isinstance(queue.drain(), ConnectionError)  # still away: the error, nothing lost
    assert capsys.readouterr().err.count("write failed") == 1  # said once, not per retry
    target.down = False
    queue.put({"n": 4})
    assert target.applied == [1, 2, 3, 4] and not queue.path.exists()


def test_the_writer_thread_drains_everything_and_survives_pickling(tmp_path):
    target = Flaky()
    queue = Backlog(tmp_path / "q.jsonl", target, (ConnectionError,))
    for n in range(20):
        queue.put({"n": n})
    assert queue.drain() is None
    assert target.applied == list(range(20)) and not queue.path.exists()
    again = pickle.loads(pickle.dumps(queue))  # Tune saves callbacks holding it
    assert again.path == queue.path and again._writer is None


def test_a_non_transient_error_is_not_swallowed(tmp_path):
    def broken(record):
        raise ValueError("a bug")
    queue = Backlog(tmp_path / "q.jsonl", broken, (ConnectionError,), background=False)
    with pytest.raises(ValueError):
        queue.put({"n": 1})


def test_runtime_failures_are_not_config_errors():
    """A study that ran and failed says so as a failure, not as a problem with its file."""
    for failure in (errors.ArmFailed, errors.TrialFailed, errors.DivergenceError,
                    errors.TrackingUnavailable):
        assert issubclass(failure, errors.StudyFailed) and issubclass(failure, errors.StudyError)
        assert not issubclass(failure, errors.ConfigError)
