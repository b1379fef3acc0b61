"""Optimiser backends for P-Sigmoid behind one small ask/tell interface, each with its own persistence.

* ``optuna`` (TPE, default) and ``optuna-gp`` (GP sampler): trials live in an optuna storage, a
  local SQLite file by default or any RDB/journal URL, so several processes or machines can share
  one study and an interrupted run resumes with every finished trial.
* ``skopt``: scikit-optimize's GP-EI optimiser (the model `gp_minimize` drives), with every
  evaluation appended to a JSON log that a resumed run replays.
A third backend implements `Backend` and registers in `BACKENDS`.
"""
from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..recipe.io import write_atomic


class OptimizerError(ValueError):
    pass


@dataclass(frozen=True)
class Space:
    """A box of named real parameters."""

    bounds: dict[str, tuple[float, float]]


@dataclass
class Trial:
    number: int
    params: dict[str, float]
    handle: Any = None


@dataclass(frozen=True)
class TrialRecord:
    number: int
    params: dict[str, float]
    value: float
    attrs: dict[str, Any] = field(default_factory=dict)


class Backend(ABC):
    """Proposes parameters (maximising the told value) and remembers every finished trial."""

    @abstractmethod
    def ask(self) -> Trial: ...

    @abstractmethod
    def tell(self, trial: Trial, value: float, attrs: dict[str, Any]) -> None: ...

    @abstractmethod
    def fail(self, trial: Trial) -> None:
        """Give up a trial that was interrupted; it does not count as finished."""

    @abstractmethod
    def finished(self) -> list[TrialRecord]: ...

    @abstractmethod
    def enqueue(self, params: dict[str, float]) -> None:
        """Make the next proposal exactly `params` (a warm start)."""

    def rank(self, trial: Trial) -> int:
        """1 + trials finished or running before this one, over every process sharing the study."""
        return len(self.finished()) + 1


class OptunaBackend(Backend):
    def __init__(self, space: Space, storage: str, study_name: str, *, sampler: str = "tpe", n_startup: int = 8,
                 seed: int = 0, resume: bool = False) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna = optuna
        if sampler == "tpe":
            chosen = optuna.samplers.TPESampler(n_startup_trials=n_startup, seed=seed)
        elif sampler == "gp":
            chosen = optuna.samplers.GPSampler(n_startup_trials=n_startup, seed=seed)
        else:
            raise OptimizerError(f"unknown optuna sampler {sampler!r}; choose tpe or gp")
        storage_obj = _optuna_storage(storage)
        existing = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(storage_obj)}
        if study_name in existing and existing[study_name] and not resume:
            raise OptimizerError(
                f"study {study_name!r} in {storage} already has trials: add --resume to continue it, "
                f"or choose another --storage"
            )
        self.study = optuna.create_study(storage=storage_obj, study_name=study_name, sampler=chosen,
                                         direction="maximize", load_if_exists=True)
        self.distributions = {k: optuna.distributions.FloatDistribution(lo, hi) for k, (lo, hi) in space.bounds.items()}

    def ask(self) -> Trial:
        trial = self.study.ask(self.distributions)
        return Trial(trial.number, dict(trial.params), trial)

    def tell(self, trial: Trial, value: float, attrs: dict[str, Any]) -> None:
        for key, val in attrs.items():
            trial.handle.set_user_attr(key, val)
        self.study.tell(trial.handle, value)

    def fail(self, trial: Trial) -> None:
        self.study.tell(trial.handle, state=self.optuna.trial.TrialState.FAIL)

    def finished(self) -> list[TrialRecord]:
        done = self.study.get_trials(deepcopy=False, states=(self.optuna.trial.TrialState.COMPLETE,))
        return [TrialRecord(t.number, dict(t.params), float(t.value), dict(t.user_attrs)) for t in done]

    def rank(self, trial: Trial) -> int:
        states = (self.optuna.trial.TrialState.COMPLETE, self.optuna.trial.TrialState.RUNNING)
        return sum(t.number <= trial.number for t in self.study.get_trials(deepcopy=False, states=states))

    def enqueue(self, params: dict[str, float]) -> None:
        self.study.enqueue_trial(params, skip_if_exists=True)


def _optuna_storage(url: str) -> Any:
    """An optuna storage from a URL: sqlite:///..., postgresql://..., or journal:///path/file.log."""
    import optuna

    if url.startswith("journal://"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(url[len("journal://"):]))
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as exc:  # bad URLs surface as sqlalchemy/driver errors with no common base
        raise OptimizerError(f"cannot open optuna storage {url!r}: {str(exc).splitlines()[0]}") from None


class SkoptBackend(Backend):
    """scikit-optimize GP with expected improvement; evaluations persisted as a JSON log."""

    def __init__(self, space: Space, log_path: Path, *, n_startup: int = 8, seed: int = 0,
                 resume: bool = False) -> None:
        try:
            from skopt import Optimizer
            from skopt.space import Real
        except ImportError:
            raise OptimizerError("--optimizer skopt needs `pip install scikit-optimize`") from None
        self.names = list(space.bounds)
        self.log_path = log_path
        self.optimizer = Optimizer([Real(lo, hi, name=k) for k, (lo, hi) in space.bounds.items()],
                                   base_estimator="GP", acq_func="EI", n_initial_points=n_startup,
                                   random_state=seed)
        self.records: list[TrialRecord] = []
        self.queued: list[dict[str, float]] = []
        if log_path.exists():
            if not resume:
                raise OptimizerError(f"{log_path} already holds trials: add --resume to continue, or remove it")
            try:
                rows = json.loads(log_path.read_text())
                self.records = [TrialRecord(r["number"], r["params"], r["value"], r.get("attrs", {})) for r in rows]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise OptimizerError(f"{log_path}: not a trial log ({exc})") from None
            if self.records:
                self.optimizer.tell([[r.params[k] for k in self.names] for r in self.records],
                                    [-r.value for r in self.records])

    def ask(self) -> Trial:
        params = self.queued.pop(0) if self.queued else dict(zip(self.names, map(float, self.optimizer.ask())))
        return Trial(len(self.records), params)

    def tell(self, trial: Trial, value: float, attrs: dict[str, Any]) -> None:
        self.optimizer.tell([trial.params[k] for k in self.names], -value)
        self.records.append(TrialRecord(trial.number, trial.params, value, attrs))
        rows = [{"number": r.number, "params": r.params, "value": r.value, "attrs": r.attrs} for r in self.records]
        write_atomic(self.log_path, json.dumps(rows, indent=1).encode())

    def fail(self, trial: Trial) -> None:
        pass  # nothing was written for it

    def finished(self) -> list[TrialRecord]:
        return list(self.records)

    def enqueue(self, params: dict[str, float]) -> None:
        self.queued.append(dict(params))


BACKENDS = ("optuna", "optuna-gp", "skopt")


def make_backend(name: str, space: Space, *, storage: str, study_name: str, log_path: Path, n_startup: int,
                 seed: int, resume: bool) -> Backend:
    if name in ("optuna", "optuna-gp"):
        return OptunaBackend(space, storage, study_name, sampler="gp" if name == "optuna-gp" else "tpe",
                             n_startup=n_startup, seed=seed, resume=resume)
    if name == "skopt":
        return SkoptBackend(space, log_path, n_startup=n_startup, seed=seed, resume=resume)
    raise OptimizerError(f"unknown optimizer {name!r}; choose from {', '.join(BACKENDS)}")


def default_storage(folder: Path, stem: str) -> str:
    """A SQLite file next to the output: sqlite:////abs/path/stem.db."""
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{os.path.abspath(folder / (stem + '.db'))}"
