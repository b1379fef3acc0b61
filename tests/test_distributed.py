"""P-Sigmoid on a real PostgreSQL server: workers in several processes share one study, workers die.

A throwaway server (initdb into a temporary folder, 127.0.0.1 on a free port, stopped and removed
afterwards) holds the study. Two "machines" run `search-recipe --storage postgresql://...`: A with
two local worker processes (--n-workers 2), B with one. B, and one of A's workers, are each killed
with SIGKILL in the middle of a trial. The study must still end with exactly --n-trials finished
trials, none lost or counted twice, and A writes the recipe once.

Without PostgreSQL's server binaries the test is skipped (a laptop); under CI=true it fails,
since .ci/run installs them.
"""
import glob
import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEARTBEAT = "1,4"  # seconds: beat interval, then grace before a silent trial counts as orphaned
N_TRIALS = 14
SERVER_USER = "postgres"  # the server refuses to run as root; .ci/run creates this user if missing


def _unavailable(reason):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI must run this test: .ci/run installs PostgreSQL)")
    pytest.skip(reason)


def _server_binaries():
    """The folder holding initdb, pg_ctl and postgres: on PATH, or Debian's /usr/lib/postgresql/N/bin."""
    folders = []
    if shutil.which("pg_ctl"):
        folders.append(Path(shutil.which("pg_ctl")).resolve().parent)
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    folders += sorted((Path(f) for f in versions), key=lambda f: int(f.parent.name) if f.parent.name.isdigit() else 0,
                      reverse=True)
    for folder in folders:
        if all((folder / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            return folder
    return None


def _as_server_user(argv):
    argv = [str(a) for a in argv]
    if os.geteuid() != 0:
        return argv
    if shutil.which("runuser"):
        return ["runuser", "-u", SERVER_USER, "--", *argv]
    return ["su", SERVER_USER, "-s", "/bin/sh", "-c", shlex.join(argv)]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """postgresql://... of an empty database on a server of our own, stopped and removed afterwards."""
    binaries = _server_binaries()
    if binaries is None:
        _unavailable("no PostgreSQL server binaries (initdb, pg_ctl, postgres) on PATH or in /usr/lib/postgresql/*/bin")
    try:
        import psycopg  # noqa: F401  (the driver the test extra installs)
    except ImportError:
        _unavailable("no PostgreSQL driver: pip install -e '.[test]' installs psycopg")
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam(SERVER_USER)
        except KeyError:
            _unavailable(f"running as root, the server needs an unprivileged user {SERVER_USER!r} (.ci/run creates it)")
    folder = Path(tempfile.mkdtemp(prefix="recipe-search-pg-"))
    if os.geteuid() == 0:
        os.chown(folder, user.pw_uid, user.pw_gid)
    data, log = folder / "data", folder / "server.log"
    started = False
    try:
        init = subprocess.run(_as_server_user([binaries / "initdb", "-D", data, "-A", "trust", "-U", "postgres", "-N",
                                               "-E", "UTF8", "--locale=C"]),
                              capture_output=True, text=True, timeout=120)
        assert init.returncode == 0, f"initdb failed:\n{init.stdout}\n{init.stderr}"
        for _ in range(3):  # the free port may be taken between the probe and the server's bind
            port = _free_port()
            options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={folder} -c fsync=off"
            start = subprocess.run(_as_server_user([binaries / "pg_ctl", "-D", data, "-l", log, "-w", "-t", "60",
                                                    "-o", options, "start"]),
                                   capture_output=True, text=True, timeout=120)
            started = True  # stop even after a failed start: it may have come up late
            if start.returncode == 0:
                break
        else:
            pytest.fail(f"PostgreSQL did not start:\n{log.read_text() if log.exists() else start.stderr}")
        subprocess.run([binaries / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "optuna"],
                       check=True, capture_output=True, timeout=60)
        yield f"postgresql://postgres@127.0.0.1:{port}/optuna"
    finally:
        if started:
            subprocess.run(_as_server_user([binaries / "pg_ctl", "-D", data, "-m", "immediate", "-w", "-t", "60",
                                            "stop"]), capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


def _trials(url):
    """[(number, state, owner pid or None)] of the study, read-only; [] until optuna's tables exist."""
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=10) as con:
            rows = con.execute(
                "SELECT t.number, t.state, a.value_json FROM trials t LEFT JOIN trial_system_attributes a "
                "ON a.trial_id = t.trial_id AND a.key = 'recipe_search:owner' ORDER BY t.number").fetchall()
    except (psycopg.errors.UndefinedTable, psycopg.OperationalError):
        return []
    return [(number, str(state).rsplit(".", 1)[-1], int(json.loads(owner).split(":")[1]) if owner else None)
            for number, state, owner in rows]


def _process_state(pid):
    """'R', 'S', 'Z' (dead, not yet reaped), ... or None when gone; and the parent's pid."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1])
    except (OSError, IndexError, ValueError):
        return None, None


def _kill(pid):
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while _process_state(pid)[0] not in (None, "Z") and time.monotonic() < deadline:
        time.sleep(0.01)


def _search(url, out, *extra):
    command = [sys.executable, "-m", "recipe_search.cli", "--method", "psigmoid", "--budget", "50%",
               "--n-trials", str(N_TRIALS), "--n-startup", "2", "--num-samples", "16", "--batch-size", "8",
               "--eval", "none", "--storage", url, "--resume", "--out", str(out),
               "--cache-dir", str(out.parent / f"{out.name}-cache"), "--quiet", *extra]
    log = open(out.parent / f"{out.name}.log", "wb")
    proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "RECIPE_SEARCH_HEARTBEAT": HEARTBEAT})
    log.close()
    return proc


def _running(trials, pids):
    return [number for number, state, owner in trials if state == "RUNNING" and owner in pids]


def test_workers_on_postgresql_finish_exactly_n_trials_when_one_is_killed(postgres, tmp_path):
    url = postgres
    a = _search(url, tmp_path / "a", "--n-workers", "2")  # machine A: two local worker processes
    b = _search(url, tmp_path / "b")                      # machine B: its main process is the worker
    killed = {}      # pid -> the trial it was running
    first_seen = {}  # trial number -> when it was first seen running
    try:
        deadline = time.monotonic() + 300
        while len(killed) < 2:
            assert time.monotonic() < deadline, "timed out waiting for both workers to run a trial"
            assert a.poll() is None and (b.pid in killed or b.poll() is None), "a search ended before both kills"
            trials, now = _trials(url), time.monotonic()
            complete = sum(state == "COMPLETE" for _, state, _ in trials)
            assert complete < N_TRIALS, "the study finished before both kills"
            for number, state, _ in trials:
                first_seen.setdefault(number, now) if state == "RUNNING" else None
            a_workers = {owner for _, _, owner in trials if owner and _process_state(owner)[1] == a.pid}
            for pids in ({b.pid}, a_workers):
                # kill in a trial that just started (one lasts about a second), so it is still running
                fresh = [(number, owner) for number, state, owner in trials
                         if state == "RUNNING" and owner in pids and now - first_seen[number] < 0.25]
                if complete >= 1 and not pids & set(killed) and fresh:
                    number, pid = fresh[0]
                    _kill(pid)  # one of our own processes: B, or a worker that A spawned
                    assert (number, "RUNNING", pid) in _trials(url), f"process {pid} was not in a trial when killed"
                    killed[pid] = number
                    break
            time.sleep(0.02)
        assert b.wait(timeout=60) == -signal.SIGKILL
        assert a.wait(timeout=600) == 0, (tmp_path / "a.log").read_text()[-3000:]
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: the search and the workers it spawned
                proc.wait(timeout=60)
    assert "search workers died" in (tmp_path / "a.log").read_text()

    recipes = sorted(p.name for p in (tmp_path / "a").glob("*-psigmoid-*.json"))
    assert recipes == ["demo-psigmoid-50pct.json"] and not list((tmp_path / "b").glob("*-psigmoid-*.json"))
    result = json.loads((tmp_path / "a" / recipes[0]).read_text())["method"]["result"]
    history = [h["trial"] for h in result["history"]]

    import optuna

    (summary,) = optuna.get_all_study_summaries(url)
    trials = optuna.load_study(study_name=summary.study_name, storage=url).get_trials()
    complete = {t.number for t in trials if t.state.name == "COMPLETE"}
    assert len(complete) == N_TRIALS and result["trials"] == N_TRIALS and sorted(history) == sorted(complete)
    assert not [t.number for t in trials if t.state.name == "RUNNING"], "an orphaned trial was left running"
    states = {t.number: t.state.name for t in trials}
    assert all(states[number] == "FAIL" for number in killed.values()), states
    # a retry lists the trials it repeats (a retry of a retry lists both)
    retried = {number for t in trials for number in t.system_attrs.get("retry_history", [])}
    assert not complete & retried, "a trial and its retry both counted"
    assert retried >= set(killed.values()), "an orphaned trial was not re-queued"
