"""What a study has done so far, in one small JSON file in its storage directory.

Ray Tune keeps each search's own state (trials, searcher, scheduler) in its experiment folder;
this file ties those folders to the study: the MLflow run ids of the study and of each
task x arm, the Tune experiments ("segments") each search consists of, the trials added with
`--add-trials`, and which config each arm's final runs retrained. It is written atomically
before the step it records, so a killed driver leaves a state that `--resume` can continue.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from contract.errors import ConfigError

STATE_FILE = "study_state.json"
# 2: the study pool (one Tune experiment per driver run serves every search and final).
STATE_VERSION = 2


@dataclass
class Segment:
    """A search's share of one pool experiment: the experiment's folder and the trials it
    runs for that search."""

    name: str
    trials: int


@dataclass
class Pool:
    """One pool experiment (a Tune experiment serving every search and final with work left
    when it started); `done` once its results are written to MLflow."""

    name: str
    done: bool = False


@dataclass
class StudyState:
    name: str
    version: int = STATE_VERSION
    study_run: str | None = None
    arm_runs: dict[str, str] = field(default_factory=dict)
    segments: dict[str, list[Segment]] = field(default_factory=dict)
    added: dict[str, int] = field(default_factory=dict)
    finals: dict[str, str] = field(default_factory=dict)  # task/arm -> config digest retrained
    pools: list[Pool] = field(default_factory=list)

    @staticmethod
    def path(storage: Path) -> Path:
        return storage / STATE_FILE

    @classmethod
    def load(cls, storage: Path) -> StudyState | None:
        path = cls.path(storage)
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text())
            if raw.get("version") == 1:
                raise ConfigError(
                    f"{path} was written before the study pool (state version 1, a queue of "
                    f"Tuners; this code reads {STATE_VERSION}): finish that study with the code "
                    "that started it, or start again in a new storage")
            raw["segments"] = {k: [Segment(**s) for s in v]
                               for k, v in raw.get("segments", {}).items()}
            raw["pools"] = [Pool(**p) for p in raw.get("pools", [])]
            state = cls(**raw)
        except ConfigError:
            raise
        except (ValueError, TypeError, AttributeError) as exc:  # not UTF-8, not JSON, wrong shape
            raise ConfigError(f"{path} is damaged ({exc}): restore it from a backup, or move "
                              "the study directory aside and start again") from exc
        if state.version != STATE_VERSION:
            raise ConfigError(f"{path} has version {state.version}, this code reads "
                              f"{STATE_VERSION}: use the code version that wrote it")
        return state

    def save(self, storage: Path) -> None:
        path = self.path(storage)
        path.parent.mkdir(parents=True, exist_ok=True)  # a cache_dir elsewhere did not make it
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1, sort_keys=True))
        os.replace(tmp, path)

    def planned(self, arm: str, trials: int) -> int:
        """Trials the arm should have: the study file's count plus what was added later."""
        return trials + self.added.get(arm, 0)

    def done_trials(self, key: str) -> int:
        return sum(s.trials for s in self.segments.get(key, []))
