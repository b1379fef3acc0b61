"""Optimiser backends for P-Sigmoid behind one small ask/tell interface, each with its own persistence.

* ``optuna`` (TPE, default) and ``optuna-gp`` (GP sampler): trials live in an optuna storage, a
  local SQLite file by default or any RDB/journal URL, so several processes or machines can share
  one study and an interrupted run resumes with every finished trial.
* ``skopt``: scikit-optimize's GP-EI optimiser (the model `gp_minimize` drives), with every
  evaluation appended to a JSON log that a resumed run replays; one process at a time (a lock).
A third backend implements `Backend` and registers its factory in `OPTIMIZERS`.

--n-trials counts finished (COMPLETE) trials only. A worker killed mid-trial (kill -9, a lost
machine) leaves a RUNNING trial that nobody will finish: every running trial beats a heartbeat
(optuna's RDB heartbeat, plus a counter in the trial's system attributes that any storage
carries), and a trial whose heartbeat stops for the grace period is failed by the next worker
that looks and re-queued once more with the same parameters (optuna's retry callback). Until
then it holds its slot, so no worker starts a trial beyond --n-trials. Interval and grace come
from $RECIPE_SEARCH_HEARTBEAT ("INTERVAL,GRACE" in whole seconds, default "10,60").
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import inspect
import json
import os
import random
import socket
import threading
import time
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..registry import Registry


class OptimizerError(ValueError):
    pass


class TrialLost(RuntimeError):
    """A trial was failed by another worker (its heartbeat looked stale) before it could be told."""


HEARTBEAT_ENV = "RECIPE_SEARCH_HEARTBEAT"
DEFAULT_HEARTBEAT = (10, 60)  # seconds between beats, seconds without a beat before a trial counts as orphaned
MAX_RETRY = 2                 # an orphaned trial is re-queued with its parameters at most this often
BEAT_KEY = "recipe_search:beat"    # system attribute: [trial_id, beats so far]
OWNER_KEY = "recipe_search:owner"  # system attribute: "host:pid:worker" of the process running the trial


def heartbeat_settings() -> tuple[int, int]:
    """(interval, grace) in seconds from $RECIPE_SEARCH_HEARTBEAT, e.g. "10,60"."""
    raw = os.environ.get(HEARTBEAT_ENV, "").strip()
    if not raw:
        return DEFAULT_HEARTBEAT
    try:
        interval, grace = (int(part) for part in raw.split(","))
    except ValueError:
        raise OptimizerError(f"{HEARTBEAT_ENV}={raw!r}: expected INTERVAL,GRACE in whole seconds, "
                             f"e.g. {DEFAULT_HEARTBEAT[0]},{DEFAULT_HEARTBEAT[1]}") from None
    if not 0 < interval < grace:
        raise OptimizerError(f"{HEARTBEAT_ENV}={raw!r}: need 0 < interval < grace")
    return interval, grace


@dataclass(frozen=True)
class Space:
    """A box of named real parameters, and named categorical ones (e.g. the selection rule)."""

    bounds: dict[str, tuple[float, float]]
    choices: dict[str, tuple[Any, ...]] = field(default_factory=dict)


@dataclass
class Trial:
    number: int
    params: dict[str, Any]
    handle: Any = None


@dataclass(frozen=True)
class TrialRecord:
    number: int
    params: dict[str, Any]
    value: float
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Progress:
    """Where a (possibly shared) study stands."""

    finished: int  # COMPLETE trials: what --n-trials counts
    claimed: int   # finished + running (alive, or orphaned and not yet failed) + queued
    waiting: int   # queued trials (a warm start, a retried orphan) that the next ask takes first


class Backend(ABC):
    """Proposes parameters (maximising the told value) and remembers every finished trial."""

    @abstractmethod
    def ask(self) -> Trial: ...

    @abstractmethod
    def tell(self, trial: Trial, value: float, attrs: dict[str, Any]) -> None:
        """Record a finished trial; raises TrialLost if another worker failed it meanwhile."""

    @abstractmethod
    def fail(self, trial: Trial) -> None:
        """Give up a trial that was interrupted; it does not count as finished."""

    @abstractmethod
    def finished(self) -> list[TrialRecord]: ...

    @abstractmethod
    def enqueue(self, params: dict[str, Any]) -> None:
        """Make the next proposal exactly `params` (a warm start)."""

    def rank(self, trial: Trial) -> int:
        """1 + trials finished, running or queued before this one, over every process sharing the study."""
        return len(self.finished()) + 1

    def progress(self) -> Progress:
        done = len(self.finished())
        return Progress(done, done, 0)

    def reap(self) -> None:
        """Fail the trials of workers that died mid-trial (no heartbeat for the grace period)."""

    def close(self) -> None:
        """Stop heartbeats and release locks; the backend is not used afterwards."""

    poll_seconds: float = 1.0  # how often a worker with no free slot looks again


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Optuna marks heartbeats experimental and warns that ask/tell is not optimize(): we know."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        yield


class _Heartbeat:
    """Beats for one running trial from a daemon thread until stopped (or the trial is finished)."""

    def __init__(self, storage: Any, trial_id: int, interval: float, record: bool) -> None:
        self.storage, self.trial_id, self.interval, self.record = storage, trial_id, interval, record
        self.count = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=f"heartbeat-trial-{trial_id}", daemon=True)

    def beat(self) -> None:
        if self.record:  # optuna's own heartbeat row, judged on the database's clock
            self.storage.record_heartbeat(self.trial_id)
        self.count += 1  # a counter any storage carries, judged by how long it stays unchanged
        self.storage.set_trial_system_attr(self.trial_id, BEAT_KEY, [self.trial_id, self.count])

    def start(self) -> None:
        self.thread.start()

    def _loop(self) -> None:
        import optuna

        while not self.stopped.wait(self.interval):
            try:
                self.beat()
            except optuna.exceptions.UpdateFinishedTrialError:
                return  # told, or failed by another worker
            except Exception:  # a busy or briefly unreachable database: the grace period spans several beats
                continue

    def stop(self) -> None:
        self.stopped.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=self.interval + 30)


def _retry_callback(optuna: Any) -> Any:
    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
    with _quiet():
        return cls(max_retry=MAX_RETRY)


class OptunaBackend(Backend):
    def __init__(self, space: Space, storage: str, study_name: str, *, sampler: Any = "tpe", n_startup: int = 8,
                 seed: int = 0, resume: bool = False, heartbeat: tuple[int, int] | None = None,
                 worker: str = "") -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna = optuna
        if isinstance(sampler, optuna.samplers.BaseSampler):
            chosen = sampler  # the user's own sampler instance, as optuna intends
        elif sampler == "tpe":
            chosen = optuna.samplers.TPESampler(n_startup_trials=n_startup, seed=seed)
        elif sampler == "gp":
            chosen = optuna.samplers.GPSampler(n_startup_trials=n_startup, seed=seed)
        else:
            raise OptimizerError(f"unknown optuna sampler {sampler!r}; choose tpe or gp")
        self.interval, self.grace = heartbeat or heartbeat_settings()
        self.poll_seconds = float(min(self.interval, 1))
        self.retry = _retry_callback(optuna)
        storage_obj = _optuna_storage(storage, (self.interval, self.grace), self.retry)
        self.db_heartbeat = isinstance(storage_obj, optuna.storages.RDBStorage)
        existing = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(storage_obj)}
        if study_name in existing and existing[study_name] and not resume:
            raise OptimizerError(
                f"study {study_name!r} in {storage} already has trials: add --resume to continue it, "
                f"or choose another --storage"
            )
        self.study = optuna.create_study(storage=storage_obj, study_name=study_name, sampler=chosen,
                                         direction="maximize", load_if_exists=True)
        self.storage = self.study._storage  # the (cached) storage the study writes through
        self.space = space
        self.owner = f"{socket.gethostname()}:{os.getpid()}" + (f":{worker}" if worker else "")
        self.beats: dict[int, _Heartbeat] = {}
        self.watched: dict[int, tuple[Any, float]] = {}  # trial id -> (beat seen, monotonic time first seen)

    def ask(self) -> Trial:
        with _quiet():
            handle = self.study.ask()  # a new RUNNING trial, or a queued one (warm start, retry) popped
        trial_id = handle._trial_id
        beat = _Heartbeat(self.storage, trial_id, self.interval, self.db_heartbeat)
        try:
            # beat before sampling (the GP sampler can take a while): a worker killed from here on
            # leaves a trial whose heartbeat goes stale; one killed before has its trial failed
            # after the grace period by the observers in reap()
            self.storage.set_trial_system_attr(trial_id, OWNER_KEY, self.owner)
            beat.beat()
            beat.start()
            params: dict[str, Any] = {k: float(handle.suggest_float(k, lo, hi)) for k, (lo, hi) in self.space.bounds.items()}
            params.update({k: handle.suggest_categorical(k, list(c)) for k, c in self.space.choices.items()})
        except BaseException:
            beat.stop()
            self._fail_quietly(trial_id)
            raise
        self.beats[trial_id] = beat
        return Trial(handle.number, params, handle)

    def _stop_beat(self, trial: Trial) -> None:
        beat = self.beats.pop(trial.handle._trial_id, None)
        if beat is not None:
            beat.stop()

    def _state(self, trial_id: int) -> Any:
        return self.storage.get_trial(trial_id).state

    def tell(self, trial: Trial, value: float, attrs: dict[str, Any]) -> None:
        try:
            for key, val in attrs.items():
                trial.handle.set_user_attr(key, val)
            with _quiet():
                self.study.tell(trial.handle, value)
        except Exception:
            if self._state(trial.handle._trial_id) != self.optuna.trial.TrialState.FAIL:
                raise
            raise TrialLost(
                f"trial {trial.number} was failed by another worker (no heartbeat for {self.grace} s): its result "
                f"is dropped and its parameters are re-queued"
            ) from None
        finally:
            self._stop_beat(trial)

    def fail(self, trial: Trial) -> None:
        self._stop_beat(trial)
        self._fail_quietly(trial.handle._trial_id)

    def _fail_quietly(self, trial_id: int) -> None:
        try:
            self.storage.set_trial_state_values(trial_id, state=self.optuna.trial.TrialState.FAIL)
        except self.optuna.exceptions.UpdateFinishedTrialError:
            pass  # already finished (or failed by another worker)

    def finished(self) -> list[TrialRecord]:
        done = self.study.get_trials(deepcopy=False, states=(self.optuna.trial.TrialState.COMPLETE,))
        return [TrialRecord(t.number, dict(t.params), float(t.value), dict(t.user_attrs)) for t in done]

    _CLAIMS = ("COMPLETE", "RUNNING", "WAITING")

    def _claims(self) -> list[Any]:
        states = tuple(getattr(self.optuna.trial.TrialState, s) for s in self._CLAIMS)
        return self.study.get_trials(deepcopy=False, states=states)

    def rank(self, trial: Trial) -> int:
        """Trials are numbered in creation order, so for any two trials the later one counts the earlier
        (a queued trial counts from when it is queued): two workers can never both take the last slot."""
        return sum(t.number <= trial.number for t in self._claims())

    def progress(self) -> Progress:
        claims = self._claims()
        state = self.optuna.trial.TrialState
        return Progress(sum(t.state == state.COMPLETE for t in claims), len(claims),
                        sum(t.state == state.WAITING for t in claims))

    def reap(self) -> None:
        if self.db_heartbeat:
            with _quiet():
                self.optuna.storages.fail_stale_trials(self.study)  # RDB heartbeat, on the database's clock
        # Trials with no heartbeat row to judge (journal storages; a worker killed between creating its
        # trial and its first beat): failed once their beat counter stays unchanged for the grace
        # period as seen from here, whatever the clocks of other machines say.
        now, watched = time.monotonic(), {}
        for t in self.study.get_trials(deepcopy=False, states=(self.optuna.trial.TrialState.RUNNING,)):
            trial_id = t._trial_id
            if trial_id in self.beats:
                continue  # ours, alive
            beat = t.system_attrs.get(BEAT_KEY)
            beat = tuple(beat) if isinstance(beat, list) and beat[:1] == [trial_id] else None  # a retry copies attrs
            if self.db_heartbeat and beat is not None:
                continue  # it has a heartbeat row: fail_stale_trials judges it
            seen = self.watched.get(trial_id)
            if seen is None or seen[0] != beat:
                watched[trial_id] = (beat, now)
            elif now - seen[1] <= self.grace:
                watched[trial_id] = seen
            else:
                self._fail_orphan(trial_id)
        self.watched = watched

    def _fail_orphan(self, trial_id: int) -> None:
        try:
            if not self.storage.set_trial_state_values(trial_id, state=self.optuna.trial.TrialState.FAIL):
                return
        except self.optuna.exceptions.UpdateFinishedTrialError:
            return  # finished meanwhile, or another worker failed it first (and re-queued it)
        with _quiet():
            self.retry(self.study, copy.deepcopy(self.storage.get_trial(trial_id)))

    def enqueue(self, params: dict[str, float]) -> None:
        self.study.enqueue_trial(params, skip_if_exists=True)

    def close(self) -> None:
        for beat in self.beats.values():
            beat.stop()
        self.beats.clear()


def _optuna_storage(url: str, heartbeat: tuple[int, int] | None = None, retry: Any = None) -> Any:
    """An optuna storage from a URL: sqlite:///..., postgresql://..., or journal:///path/file.log.

    With `heartbeat` (interval, grace), an RDB storage records heartbeats and fails stale trials,
    handing each to `retry`."""
    import optuna

    if url.startswith("journal://"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(url[len("journal://"):]))
    import sqlalchemy.exc

    kwargs: dict[str, Any] = {}
    if heartbeat is not None:
        callback = ("heartbeat_stale_trial_callback"
                    if "heartbeat_stale_trial_callback" in inspect.signature(optuna.storages.RDBStorage).parameters
                    else "failed_trial_callback")  # optuna < 4.9
        kwargs = {"heartbeat_interval": heartbeat[0], "grace_period": heartbeat[1], callback: retry}
    with_driver = _with_postgresql_driver(url)
    for attempt in range(5):
        try:
            with _quiet():
                return optuna.storages.RDBStorage(with_driver, **kwargs)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as exc:
            # workers on a fresh database all create optuna's tables at once, and all but one lose
            # the race; the tables exist when they try again
            if attempt == 4:
                raise OptimizerError(f"cannot open optuna storage {url!r}: {str(exc).splitlines()[0]}") from None
            time.sleep(0.2 + random.random())
        except Exception as exc:  # bad URLs surface as sqlalchemy/driver errors with no common base
            raise OptimizerError(f"cannot open optuna storage {url!r}: {str(exc).splitlines()[0]}") from None
    raise AssertionError("unreachable")


def _with_postgresql_driver(url: str) -> str:
    """postgresql://... with whichever driver is installed (SQLAlchemy's default differs between versions)."""
    if not url.startswith("postgresql://"):
        return url
    for module, scheme in (("psycopg", "postgresql+psycopg"), ("psycopg2", "postgresql+psycopg2")):
        if importlib.util.find_spec(module) is not None:
            return scheme + url[len("postgresql"):]
    raise OptimizerError("a postgresql:// storage needs a driver: pip install 'psycopg[binary]'")


def study_progress(storage: str, study_name: str) -> Progress:
    """Where a study stands, read without joining it (e.g. after local workers exited)."""
    import optuna

    study = optuna.load_study(study_name=study_name, storage=_optuna_storage(storage))
    state = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False, states=(state.COMPLETE, state.RUNNING, state.WAITING))
    return Progress(sum(t.state == state.COMPLETE for t in trials), len(trials),
                    sum(t.state == state.WAITING for t in trials))


def _write_durable(path: Path, data: bytes) -> None:
    """Write via a synced temporary file renamed over `path`: a kill or crash leaves the old or the new log."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


class SkoptBackend(Backend):
    """scikit-optimize GP with expected improvement; evaluations persisted as a JSON log.

    One process at a time: the log is locked (flock, released by the kernel even on kill -9), so a
    second run on it fails at once instead of overwriting the first one's trials."""

    def __init__(self, space: Space, log_path: Path, *, n_startup: int = 8, seed: int = 0,
                 resume: bool = False) -> None:
        try:
            from skopt import Optimizer
            from skopt.space import Categorical, Real
        except ImportError:
            raise OptimizerError("--optimizer skopt needs `pip install scikit-optimize`") from None
        self.names = [*space.bounds, *space.choices]
        self.log_path = log_path
        self.lock = _lock_exclusively(log_path.with_name(log_path.name + ".lock"))
        dims = [Real(lo, hi, name=k) for k, (lo, hi) in space.bounds.items()]
        dims += [Categorical(list(c), name=k) for k, c in space.choices.items()]
        self.optimizer = Optimizer(dims,
                                   base_estimator="GP", acq_func="EI", n_initial_points=n_startup,
                                   random_state=seed)
        self.records: list[TrialRecord] = []
        self.queued: list[dict[str, float]] = []
        try:
            if log_path.exists():
                if not resume:
                    raise OptimizerError(f"{log_path} already holds trials: add --resume to continue, or remove it")
                self.records = _read_log(log_path, space)
                if self.records:
                    self.optimizer.tell([[r.params[k] for k in self.names] for r in self.records],
                                        [-r.value for r in self.records])
        except BaseException:
            self.close()
            raise

    def ask(self) -> Trial:
        params = self.queued.pop(0) if self.queued else dict(zip(self.names, map(_plain, self.optimizer.ask())))
        return Trial(len(self.records), params)

    def tell(self, trial: Trial, value: float, attrs: dict[str, Any]) -> None:
        record = TrialRecord(trial.number, trial.params, value, attrs)
        rows = [{"number": r.number, "params": r.params, "value": r.value, "attrs": r.attrs}
                for r in [*self.records, record]]
        _write_durable(self.log_path, json.dumps(rows, indent=1).encode())  # counted once it is on disk
        self.records.append(record)
        self.optimizer.tell([trial.params[k] for k in self.names], -value)

    def fail(self, trial: Trial) -> None:
        pass  # nothing was written for it

    def finished(self) -> list[TrialRecord]:
        return list(self.records)

    def enqueue(self, params: dict[str, Any]) -> None:
        self.queued.append(dict(params))

    def close(self) -> None:
        if self.lock is not None:
            self.lock.close()
            self.lock = None


def _plain(value: Any) -> Any:
    """A parameter as JSON and optuna keep it: numpy scalars become Python numbers, reals floats."""
    value = value.item() if hasattr(value, "item") else value
    return float(value) if isinstance(value, float) else value


def _read_log(path: Path, space: Space) -> list[TrialRecord]:
    def param(row: dict, key: str) -> Any:
        value = row["params"][key]
        if key in space.choices:
            if value not in space.choices[key]:
                raise ValueError(f"{key} {value!r} is not one of {list(space.choices[key])}")
            return value
        return float(value)

    try:
        rows = json.loads(path.read_text())
        records = [TrialRecord(int(r["number"]), {k: param(r, k) for k in [*space.bounds, *space.choices]},
                               float(r["value"]), r.get("attrs", {})) for r in rows]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise OptimizerError(f"{path}: not a trial log ({exc})") from None
    if [r.number for r in records] != list(range(len(records))):
        raise OptimizerError(f"{path}: trial numbers are not 0..{len(records) - 1} in order "
                             f"(lost or duplicated trials); remove it to start over")
    return records


def _lock_exclusively(path: Path) -> Any:
    """An open file holding an exclusive flock on `path`, or OptimizerError if another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        import fcntl
    except ImportError:  # no flock (Windows): one process at a time is then the user's business
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise OptimizerError(
            f"{path.with_suffix('')} is in use by another search (skopt keeps its trials in one process); "
            f"wait for it, or share trials with --optimizer optuna and --storage"
        ) from None
    return handle


def _optuna(kind: str) -> Callable[..., Backend]:
    def make(space: Space, *, storage: str, study_name: str, log_path: Path, n_startup: int, seed: int,
             resume: bool, worker: str = "") -> Backend:
        return OptunaBackend(space, storage, study_name, sampler=kind, n_startup=n_startup, seed=seed, resume=resume,
                             worker=worker)
    return make


def _skopt(space: Space, *, storage: str, study_name: str, log_path: Path, n_startup: int, seed: int,
           resume: bool, worker: str = "") -> Backend:
    return SkoptBackend(space, log_path, n_startup=n_startup, seed=seed, resume=resume)


#: Optimiser name -> backend factory. Register another with `OPTIMIZERS.register(name, factory)`.
OPTIMIZERS: Registry[Callable[..., Backend]] = Registry("optimizer")
OPTIMIZERS.register("optuna", _optuna("tpe"))
OPTIMIZERS.register("optuna-gp", _optuna("gp"))
OPTIMIZERS.register("skopt", _skopt)


def optimizer_name(optimizer: Any) -> str:
    """How recipes and study names record an optimiser: its registered name, or an optuna sampler's class."""
    return optimizer if isinstance(optimizer, str) else f"optuna:{type(optimizer).__name__}"


def make_backend(optimizer: Any, space: Space, *, storage: str, study_name: str, log_path: Path, n_startup: int,
                 seed: int, resume: bool, worker: str = "") -> Backend:
    """The backend for a registered optimiser name, or for an optuna sampler instance (used as given)."""
    if not isinstance(optimizer, str):
        import optuna

        if not isinstance(optimizer, optuna.samplers.BaseSampler):
            raise OptimizerError(f"optimizer must be a name ({', '.join(OPTIMIZERS.names())}) or an optuna sampler, "
                                 f"not {type(optimizer).__name__}")
        return OptunaBackend(space, storage, study_name, sampler=optimizer, n_startup=n_startup, seed=seed,
                             resume=resume, worker=worker)
    try:
        factory = OPTIMIZERS.get(optimizer)
    except ValueError as exc:
        raise OptimizerError(str(exc)) from None
    return factory(space, storage=storage, study_name=study_name, log_path=log_path, n_startup=n_startup,
                   seed=seed, resume=resume, worker=worker)


def default_storage(folder: Path, stem: str) -> str:
    """A SQLite file next to the output: sqlite:////abs/path/stem.db."""
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{os.path.abspath(folder / (stem + '.db'))}"
