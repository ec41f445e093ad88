"""The Ray backend against a REAL Ray cluster on this machine, and a local `ray.init` cluster.

- one `ray start --head --block` per module (2 CPUs, no dashboard, its own temp dir), stopped by
  terminating that command (which takes its processes along), never by `ray stop` (that would
  stop every Ray instance of this user on the machine);
- mechanics with the stand-in trainer: slots, per-trial resources, exit codes -> states, time
  limit, cancel (SIGTERM first), re-attach from a new backend, a killed Ray worker;
- end to end with the real trainer through the CLI: a small sweep on the cluster whose Ray worker
  is SIGKILLed mid-trial (retried, resumed from its checkpoint, one MLflow run per trial, a re-run
  trains nothing); the orchestrator SIGKILLed mid-sweep (the trials live on as detached actors and
  are re-attached); the same small sweep on a local `ray.init` cluster.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from orchestrator.backends import BackendError, JobHandle, JobStatus, backend_class, get_backend
from orchestrator.spec import RayBackendSpec, RayOptions, ResourcesSpec

from conftest import (MICRO_BASE, PYTHON, REPO, make_trial, pid_alive, read_ledger, submit, wait_finished,
                      wait_for, write_spec)

wait_for_ray_jobs = functools.partial(wait_finished, timeout=60, interval=0.1)  # Ray schedules slower

RAY = str(Path(PYTHON).with_name("ray"))
FINAL_METRICS = ("linear_top1_cls", "knn_top1", "seg_miou", "depth_rmse", "wall_time_s")
SPECIALIZATIONS = {"none": "none", "paper": "paper"}


# ----------------------------------------------------------------------------------------------
# Fixtures: a real cluster per module, one driver connection for the in-process tests
# ----------------------------------------------------------------------------------------------
def _processes_mentioning(text: str) -> list[int]:
    """Pids whose command line holds `text` (our cluster's unique temp dir): ours and only ours."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry.name))
    return pids


def _kill_pids(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class Cluster:
    def __init__(self, address: str, temp_dir: Path) -> None:
        self.address = address
        self.temp_dir = temp_dir


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.pop("PYTEST_CURRENT_TEST", None)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Ray >= 2.5x turns token auth on when ~/.ray/auth_token exists (any earlier local ray.init
    # writes one); the test clusters are private to this machine and must not depend on $HOME.
    env["RAY_AUTH_MODE"] = "disabled"
    return env


@pytest.fixture(scope="module")
def ray_cluster():
    from conftest import free_port

    temp_dir = Path(tempfile.mkdtemp(prefix="rayt", dir="/tmp"))  # short: Ray's socket paths have a length limit
    port = free_port()
    log_path = temp_dir / "head.log"
    with open(log_path, "wb") as log:
        head = subprocess.Popen(
            [RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
             "--disable-usage-stats", f"--temp-dir={temp_dir}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_clean_env(), start_new_session=True)
    try:
        wait_for(lambda: "block forever" in log_path.read_text(errors="replace") or head.poll() is not None,
                 timeout=120, interval=0.2, what="ray start --head")
        assert head.poll() is None, log_path.read_text(errors="replace")[-3000:]
        yield Cluster(f"127.0.0.1:{port}", temp_dir)
    finally:
        head.send_signal(signal.SIGTERM)  # --block: the command stops the processes it started
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        _kill_pids(_processes_mentioning(str(temp_dir)))  # stragglers of this cluster only
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_driver(ray_cluster):
    """This test process as a driver of the module's cluster (RayBackend reuses the connection)."""
    import ray

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_MODE", "disabled")
        patch.setenv("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address=ray_cluster.address, logging_level="ERROR", log_to_driver=False)
        yield ray_cluster
        ray.shutdown()


def ray_backend(max_parallel: int = 1, resources: dict | None = None, **options):
    """A RayBackend as a spec with these resources and options builds it."""
    from orchestrator.backends.ray import RayBackend

    spec = RayBackendSpec(max_parallel=max_parallel, resources=ResourcesSpec(**(resources or {})),
                          options=RayOptions(**options))
    return RayBackend(spec)


def cluster_backend(cluster: Cluster, stand_in=None, **kwargs):
    from orchestrator.backends.ray import RayBackend

    # model_construct: a time limit of seconds (time_min < 1), which a spec cannot ask for
    resources = ResourcesSpec.model_construct(**{"cpus_per_trial": 1, "mem_gb": 0.25, **kwargs.pop("resources", {})})
    if stand_in is not None:
        kwargs.setdefault("command", stand_in.command)
        kwargs.setdefault("env", {"STAND_IN_BEHAVIOR": str(stand_in.behavior_file),
                                  "STAND_IN_EVENTS": str(stand_in.events_file)})
    spec = RayBackendSpec(max_parallel=kwargs.pop("max_parallel", 2), resources=resources,
                          options=RayOptions(address=cluster.address, **kwargs))
    return RayBackend(spec)


def wait_status(backend, handle, status: JobStatus, timeout: float = 60.0) -> None:
    wait_for(lambda: backend.poll([handle])[handle.trial_id].status == status, timeout=timeout, interval=0.1,
             what=f"{handle.trial_id} {status.value}")


# ----------------------------------------------------------------------------------------------
# Without a cluster
# ----------------------------------------------------------------------------------------------
def test_registered_lazy_and_built_from_a_spec(tmp_path):
    """`kind: ray` finds the backend; resources map to Ray's; importing it does not import ray."""
    code = (
        "import sys\n"
        "from orchestrator.backends import backend_class\n"
        "from orchestrator.spec import RayBackendSpec, ResourcesSpec\n"
        "cls = backend_class('ray')\n"
        "b = cls(RayBackendSpec(max_parallel=3, resources=ResourcesSpec(cpus_per_trial=2, gpus_per_trial=1, mem_gb=1.5,\n"
        "                                                               time_min=2)))\n"
        "h = {'trial_id': 't', 'backend': 'ray', 'job_id': 'trial-t-1', 'run_dir': '/nonexistent', 'log_path': '/x',\n"
        "     'info': {'local_cluster': True}}\n"
        "assert b.reattach(h) is None\n"  # a local cluster's trials died with it: no connection needed
        "assert b.poll([]) == {} and b.active == 0 and b.free_slots == 3\n"
        "b.cancel_many([])\n"
        "b.close()\n"
        "print((b.cpus_per_trial, b.gpus_per_trial, b.memory_bytes, b.time_limit_s), 'ray' in sys.modules)\n"
    )
    proc = subprocess.run([PYTHON, "-c", code], cwd=REPO, capture_output=True, text=True, env=_clean_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"(2.0, 1.0, {int(1.5 * 2**30)}, 120.0) False"

    from orchestrator.backends.ray import RayBackend
    from orchestrator.spec import load_spec

    spec_path = write_spec(tmp_path, "ray_spec", backend={"kind": "ray", "max_parallel": 3,
                                                           "resources": {"cpus_per_trial": 2},
                                                           "options": {"address": "ray://head:10001", "grace_s": 5}})
    spec = load_spec(spec_path)
    backend = get_backend(spec.backend)
    assert backend_class("ray") is RayBackend and isinstance(backend, RayBackend)
    assert (backend.max_parallel, backend.cpus_per_trial, backend.address, backend.grace_s) == (3, 2.0, "ray://head:10001", 5.0)
    assert backend.memory_bytes == 4 * 2**30 and backend.time_limit_s == 3600  # the spec's defaults


def test_requests_no_node_can_hold_are_refused_on_a_local_cluster():
    class FakeRay:
        @staticmethod
        def nodes():
            return [{"Alive": True, "Resources": {"CPU": 2.0, "memory": 8 * 2**30}},
                    {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0, "memory": 512 * 2**30}}]

    fits = ray_backend(resources={"cpus_per_trial": 2, "mem_gb": 4})
    fits._check_feasible(FakeRay())
    too_big = ray_backend(resources={"cpus_per_trial": 1, "gpus_per_trial": 1, "mem_gb": 4})
    with pytest.raises(BackendError, match="no Ray node can hold one trial"):
        too_big._check_feasible(FakeRay())  # a local cluster never grows: it would wait forever
    remote = ray_backend(resources={"cpus_per_trial": 4}, address="ray://head:10001")
    with pytest.warns(UserWarning, match="no Ray node can hold one trial"):
        remote._check_feasible(FakeRay())  # an autoscaler may add a node that fits


def test_outcomes_and_ray_errors_map_to_failure_classes(tmp_path):
    """How an attempt ended -> the runner's failure class (transient ones are retried)."""
    import ray

    from orchestrator.backends.ray.outcome import classify_ray_error as _classify_ray_error
    from orchestrator.backends.ray.outcome import state_from_outcome as _state_from_disk

    handle = JobHandle(trial_id="t", backend="ray", job_id="trial-t-1", run_dir=tmp_path, log_path=tmp_path / "log",
                       info={"attempt": "1", "time_limit_s": 60.0})
    (tmp_path / "log").write_text("Traceback ...\nValueError: bad data\n")
    cases = [
        ({"returncode": 75}, "preempted"), ({"returncode": -9}, "killed"), ({"returncode": 0}, "error"),
        ({"returncode": 3}, "error"), ({"returncode": 75, "timed_out": True}, "timeout"),
        ({"returncode": None, "cancelled": True}, "preempted"), ({"returncode": None, "busy": True, "error": "x"}, "lost"),
        ({"returncode": None, "error": "FileNotFoundError: python"}, "error"),
    ]
    for outcome, failure_class in cases:
        state = _state_from_disk(handle, outcome)
        assert (state.status, state.failure_class) == (JobStatus.FAILED, failure_class), outcome
    assert _state_from_disk(handle, {"returncode": 3}).error == "exit code 3: ValueError: bad data"
    assert _state_from_disk(handle, None).failure_class == "lost"  # nothing known at all
    (tmp_path / "trainer.pid").write_text(json.dumps({"attempt": "1", "outcome": {"returncode": -15}}))
    assert _state_from_disk(handle, None).failure_class == "killed"  # the exit code the actor wrote down
    (tmp_path / "result.json").write_text(json.dumps({"status": "failed", "failure_class": "nan", "error": "NaN"}))
    assert _state_from_disk(handle, {"returncode": 1}).failure_class == "nan"  # the trainer's verdict wins

    assert _classify_ray_error(ray, ray.exceptions.ActorDiedError())[0] == "killed"
    init_failed = ray.exceptions.RayActorError(error_msg="ModuleNotFoundError: orchestrator", actor_init_failed=True)
    assert _classify_ray_error(ray, init_failed)[0] == "error"  # retrying cannot fix a broken worker setup
    drained = ray.exceptions.RayActorError(error_msg="node drained", preempted=True)
    assert _classify_ray_error(ray, drained)[0] == "preempted"


# ----------------------------------------------------------------------------------------------
# Mechanics on the real cluster, with the stand-in trainer
# ----------------------------------------------------------------------------------------------
def test_slots_states_and_per_trial_resources(tmp_path, stand_in, ray_driver):
    stand_in.behave(ok={"sleep": 0.5}, nan={"fail": "nan"}, crash={"fail": "crash"}, sig={"fail": "signal"},
                    zero={"fail": "exit0"})
    backend = cluster_backend(ray_driver, stand_in, max_parallel=2)
    trials = [make_trial(name) for name in ("ok", "nan", "crash", "sig", "zero")]
    handles = [submit(backend, trials[0], tmp_path), submit(backend, trials[1], tmp_path)]
    assert backend.free_slots == 0
    with pytest.raises(BackendError, match="full"):
        submit(backend, trials[2], tmp_path)
    states = wait_for_ray_jobs(backend, handles)
    handles = [submit(backend, trials[2], tmp_path), submit(backend, trials[3], tmp_path)]
    states.update(wait_for_ray_jobs(backend, handles))
    states.update(wait_for_ray_jobs(backend, [submit(backend, trials[4], tmp_path)]))
    got = {t.config["name"]: (states[t.trial_id].status, states[t.trial_id].failure_class) for t in trials}
    assert got == {"ok": (JobStatus.DONE, None), "nan": (JobStatus.FAILED, "nan"), "crash": (JobStatus.FAILED, "error"),
                   "sig": (JobStatus.FAILED, "killed"), "zero": (JobStatus.FAILED, "error")}
    assert "exit code 3" in states[trials[2].trial_id].error and "stand-in crash" in states[trials[2].trial_id].error
    assert states[trials[3].trial_id].error == "killed by SIGKILL"
    ok_dir = tmp_path / trials[0].trial_id
    result = json.loads((ok_dir / "result.json").read_text())
    assert result["threads"] == "1"  # OMP_NUM_THREADS = cpus_per_trial
    log = (ok_dir / "trainer.log").read_text()
    assert "orchestrator (ray actor trial-" in log and "stand-in trainer for ok attempt 1" in log
    pid_info = json.loads((ok_dir / "trainer.pid").read_text())
    assert pid_info["outcome"]["returncode"] == 0 and pid_info["worker_pid"] != pid_info["pid"]
    assert backend.active == 0

    # Ray enforces the per-trial resources: two 2-CPU trials on a 2-CPU cluster never overlap.
    stand_in.behave(big={"sleep": 1.0})
    big = cluster_backend(ray_driver, stand_in, max_parallel=2, resources={"cpus_per_trial": 2})
    first, second = make_trial("big", 1), make_trial("big", 2)
    handles = [submit(big, first, tmp_path), submit(big, second, tmp_path)]
    wait_for(lambda: JobStatus.RUNNING in {s.status for s in big.poll(handles).values()}, interval=0.1, what="one running")
    assert {s.status for s in big.poll(handles).values()} == {JobStatus.RUNNING, JobStatus.PENDING}
    assert {s.status for s in wait_for_ray_jobs(big, handles).values()} == {JobStatus.DONE}
    starts = sorted(e["t"] for e in stand_in.events("start") if e["name"] == "big")
    ends = sorted(e["t"] for e in stand_in.events("end") if e["name"] == "big")
    assert len(starts) == 2 and starts[1] >= ends[0]


def test_cancel_sigterm_first_time_limit_and_reattach(tmp_path, stand_in, ray_driver):
    stand_in.behave(long={"sleep": 60}, stubborn={"sleep": 60, "ignore_sigterm": True})
    backend = cluster_backend(ray_driver, stand_in, max_parallel=2, grace_s=5)
    long_trial, stubborn = make_trial("long"), make_trial("stubborn")
    handle = submit(backend, long_trial, tmp_path)
    other = submit(backend, stubborn, tmp_path)
    wait_status(backend, handle, JobStatus.RUNNING)
    wait_status(backend, other, JobStatus.RUNNING)
    wait_for(lambda: len(stand_in.events("start")) == 2, what="both stand-ins past their signal setup")
    time.sleep(0.2)  # the stubborn one sets SIG_IGN right after its start event

    # A new orchestrator (a new backend) finds the live actor by name and watches it.
    saved = json.loads(json.dumps(handle.to_dict()))  # what the ledger keeps
    second = cluster_backend(ray_driver, stand_in)
    again = second.reattach(saved)
    assert again is not None and again.job_id == handle.job_id and second.active == 1
    assert second.poll([again])[long_trial.trial_id].status == JobStatus.RUNNING
    assert second.reattach({**saved, "info": {**saved["info"], "attempt": "other"}}) is None  # not this attempt
    assert second.reattach({**saved, "job_id": "trial-gone-1", "info": {**saved["info"], "actor": "trial-gone-1"}}) is None
    assert ray_backend().reattach({**saved, "info": {**saved["info"], "local_cluster": True}}) is None

    # Cancel: SIGTERM first (the trainer checkpoints and exits 75), no need to wait out the grace.
    run_dir = tmp_path / long_trial.trial_id
    pid = json.loads((run_dir / "trainer.pid").read_text())["pid"]
    started = time.monotonic()
    second.cancel(again)
    assert time.monotonic() - started < 5
    assert (run_dir / "got_sigterm").exists() and not pid_alive(pid)
    assert second.active == 0
    assert json.loads((run_dir / "trainer.pid").read_text())["outcome"]["returncode"] == 75
    # The first backend still holds its handle: it now reads how the attempt ended.
    assert backend.poll([handle])[long_trial.trial_id].failure_class == "preempted"

    # A trainer that ignores SIGTERM is SIGKILLed after the grace period.
    stubborn_pid = json.loads((tmp_path / stubborn.trial_id / "trainer.pid").read_text())["pid"]
    backend.cancel_many([other], grace_s=0.5)
    assert not pid_alive(stubborn_pid) and backend.active == 0

    # resources.time_min: SIGTERM at the limit, failure class timeout (transient: retried, resumes).
    limited = cluster_backend(ray_driver, stand_in, resources={"time_min": 0.03})
    state = wait_for_ray_jobs(limited, [submit(limited, make_trial("long", 7), tmp_path)])[make_trial("long", 7).trial_id]
    assert (state.status, state.failure_class) == (JobStatus.FAILED, "timeout")


def test_killed_ray_worker_fails_the_attempt_as_killed_and_stops_its_trainer(tmp_path, stand_in, ray_driver):
    stand_in.behave(long={"sleep": 60})
    backend = cluster_backend(ray_driver, stand_in)
    trial = make_trial("long", 3)
    handle = submit(backend, trial, tmp_path)
    wait_status(backend, handle, JobStatus.RUNNING)
    wait_for(lambda: stand_in.events("start"), what="the stand-in past its signal setup")
    run_dir = tmp_path / trial.trial_id
    info = json.loads((run_dir / "trainer.pid").read_text())
    os.kill(info["worker_pid"], signal.SIGKILL)
    state = wait_for_ray_jobs(backend, [handle])[trial.trial_id]
    assert (state.status, state.failure_class) == (JobStatus.FAILED, "killed")  # transient: the runner retries
    assert "Ray worker" in state.error
    # PDEATHSIG: the orphaned trainer got SIGTERM (it checkpoints and exits) instead of training on.
    wait_for(lambda: not pid_alive(info["pid"]), timeout=10, what="orphaned trainer gone")
    assert (run_dir / "got_sigterm").exists()

    # The next attempt in the same run dir starts once the previous trainer released it.
    stand_in.behave(long={"sleep": 0.2})
    again = submit(backend, trial, tmp_path)
    assert wait_for_ray_jobs(backend, [again])[trial.trial_id].status == JobStatus.DONE
    assert "stand-in trainer for long attempt 2" in (run_dir / "trainer.log").read_text()


# ----------------------------------------------------------------------------------------------
# End to end with the real trainer, through the CLI
# ----------------------------------------------------------------------------------------------
def orchestrator(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "orchestrator", *args], cwd=REPO, env=ray_env(env), capture_output=True,
                          text=True, timeout=timeout)


def ray_env(env: dict[str, str]) -> dict[str, str]:
    return {**env, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def children_by_trial(db: Path, sweep: str, ledger: dict) -> dict[str, str]:
    """Exactly one parent and one FINISHED child with final metrics per trial; {trial_id: run id}."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name(sweep)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and len(parents) + len(children) == len(runs)
    assert parents[0].info.run_id == ledger["meta"]["parent_run_id"]
    by_trial = {c.data.tags["trial_id"]: c for c in children}
    assert len(by_trial) == len(children), "two child runs for one trial"
    assert set(by_trial) == set(ledger["trials"])
    for trial_id, child in by_trial.items():
        assert child.info.status == "FINISHED", (trial_id, child.info.status)
        missing = [m for m in FINAL_METRICS if m not in child.data.metrics]
        assert not missing, f"{trial_id}: final metrics missing {missing}"
    return {tid: child.info.run_id for tid, child in by_trial.items()}


def ray_spec(folder: Path, name: str, address: str | None, **schedule) -> Path:
    base = {**MICRO_BASE, "schedule": {**MICRO_BASE["schedule"], **schedule}}
    options = {"address": address, "grace_s": 10} if address else {"grace_s": 10}
    return write_spec(folder, name, base=base, axes={"specialization": {"key": "model.specialization",
                                                                          "values": SPECIALIZATIONS}},
                      backend={"kind": "ray", "max_parallel": 2, "retries": 1,
                               "resources": {"cpus_per_trial": 1, "mem_gb": 1}, "options": options})


def assert_sweep_done_once(project_root: Path, sweep: str, spec: Path, env: dict[str, str]) -> dict:
    ledger = read_ledger(project_root, sweep)
    assert len(ledger["trials"]) == 2 and {t["state"] for t in ledger["trials"].values()} == {"done"}
    run_ids = children_by_trial(project_root / "mlflow.db", sweep, ledger)
    for trial_id, trial in ledger["trials"].items():
        run_dir = Path(trial["run_dir"])
        assert run_dir == project_root / "runs" / "trials" / trial_id
        assert (run_dir / "mlflow_run_id").read_text().strip() == run_ids[trial_id]
        assert trial["job"] is None and trial["history"][-1]["job_id"].startswith(f"trial-{trial_id}-")

    again = orchestrator("run", str(spec), "--no-report", "--no-progress", env=env)  # dedup: nothing to train
    assert again.returncode == 0, again.stdout + again.stderr
    assert "started" not in again.stdout
    after = read_ledger(project_root, sweep)
    assert {t["attempts"] for t in after["trials"].values()} == {t["attempts"] for t in ledger["trials"].values()}
    assert children_by_trial(project_root / "mlflow.db", sweep, after) == run_ids
    return ledger


@pytest.mark.slow
def test_ray_worker_killed_mid_trial_is_retried_and_resumes(tmp_path, project_root, cli_env, mlflow_db, ray_cluster):
    """A small sweep on the cluster through the CLI; one trial's Ray worker is SIGKILLed past a checkpoint."""
    spec = ray_spec(tmp_path, "ray_kill", ray_cluster.address, steps=40, checkpoint_every=5)
    proc = subprocess.Popen([PYTHON, "-m", "orchestrator", "run", str(spec), "--no-report", "--no-progress"],
                            cwd=REPO, env=ray_env(cli_env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def running_past_a_checkpoint():
        for trial in read_ledger(project_root, "ray_kill")["trials"].values():
            run_dir = Path(trial["run_dir"])
            if trial["state"] != "running" or not (run_dir / "checkpoint.pt").exists() \
                    or not (run_dir / "mlflow_run_id").exists():
                continue
            try:
                info = json.loads((run_dir / "trainer.pid").read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if info.get("attempt") == trial["job"]["info"]["attempt"] and "outcome" not in info:
                return trial, info
        return None

    try:
        victim, info = wait_for(running_past_a_checkpoint, timeout=180, interval=0.1, what="a trial past a checkpoint")
        run_id_before = (Path(victim["run_dir"]) / "mlflow_run_id").read_text().strip()
        os.kill(info["worker_pid"], signal.SIGKILL)  # the Ray worker (actor) process, mid-trial
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert "retry" in out and "killed" in out, out

    ledger = read_ledger(project_root, "ray_kill")
    assert {t["state"] for t in ledger["trials"].values()} == {"done"}
    record = ledger["trials"][victim["trial_id"]]
    assert record["attempts"] == 2 and record["failures"] == 1  # one retry spent, both attempts in the ledger
    assert [h["failure_class"] for h in record["history"]] == ["killed", None]
    assert record["history"][1]["started_at"] >= record["history"][0]["ended_at"]
    log = Path(record["run_dir"], "trainer.log").read_text()
    assert "resumed from" in log, log[-3000:]  # continued from its checkpoint, not from scratch
    assert log.count("orchestrator (ray actor") == 2
    run_ids = children_by_trial(project_root / "mlflow.db", "ray_kill", ledger)
    assert run_ids[victim["trial_id"]] == run_id_before  # the retry continued its own MLflow run
    assert_sweep_done_once(project_root, "ray_kill", spec, cli_env)  # and a re-run trains nothing


@pytest.mark.slow
def test_trials_outlive_a_killed_orchestrator_and_are_reattached(tmp_path, project_root, cli_env, mlflow_db,
                                                                ray_cluster):
    """On a real cluster the trials are detached actors: kill -9 the orchestrator, run again, and
    the new one finds them by name and watches them to the end; nothing is trained twice."""
    spec = ray_spec(tmp_path, "ray_restart", ray_cluster.address, steps=40, checkpoint_every=10)
    proc = subprocess.Popen([PYTHON, "-m", "orchestrator", "run", str(spec), "--no-report", "--no-progress"],
                            cwd=REPO, env=ray_env(cli_env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def both_training():
        trials = list(read_ledger(project_root, "ray_restart")["trials"].values())
        infos = []
        for trial in trials:
            run_dir = Path(trial["run_dir"] or "/nonexistent")
            try:
                info = json.loads((run_dir / "trainer.pid").read_text())
            except (OSError, json.JSONDecodeError):
                return None
            if trial["state"] != "running" or info.get("attempt") != trial["job"]["info"]["attempt"]:
                return None
            if not (run_dir / "mlflow_run_id").exists():
                return None
            infos.append(info)
        return infos if len(infos) == 2 else None

    try:
        infos = wait_for(both_training, timeout=180, interval=0.1, what="both trials training")
    finally:
        proc.kill()  # SIGKILL: no cancel, no cleanup
        proc.communicate()
    assert all(pid_alive(info["pid"]) for info in infos), "the trainers died with their orchestrator"

    again = orchestrator("run", str(spec), "--no-report", "--no-progress", env=cli_env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("reattached") == 2 and "started" not in again.stdout, again.stdout
    ledger = read_ledger(project_root, "ray_restart")
    assert {t["state"] for t in ledger["trials"].values()} == {"done"}
    assert {t["attempts"] for t in ledger["trials"].values()} == {1}  # watched again, never relaunched
    children_by_trial(project_root / "mlflow.db", "ray_restart", ledger)
    for trial in ledger["trials"].values():
        assert "resumed from" not in Path(trial["run_dir"], "trainer.log").read_text()


@pytest.mark.slow
def test_sweep_end_to_end_on_a_local_ray_init_cluster(tmp_path, project_root, cli_env, mlflow_db):
    """No address: the orchestrator starts a local cluster with ray.init and it ends with the run."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rayl", dir="/tmp"))
    env = {**_clean_env(), **{k: v for k, v in cli_env.items() if k.startswith("CLS_")}, "RAY_TMPDIR": str(ray_tmp)}
    spec = ray_spec(tmp_path, "ray_local", None)
    try:
        first = orchestrator("run", str(spec), "--no-report", "--no-progress", env=env)
        assert first.returncode == 0, first.stdout + first.stderr
        assert first.stdout.count("started") == 2
        assert not _processes_mentioning(str(ray_tmp)), "the local cluster outlived its orchestrator"
        ledger = assert_sweep_done_once(project_root, "ray_local", spec, env)
        assert {t["attempts"] for t in ledger["trials"].values()} == {1}
        assert all(t["history"][0].get("job_id") for t in ledger["trials"].values())
    finally:
        _kill_pids(_processes_mentioning(str(ray_tmp)))
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_search_runs_its_trials_on_ray(tmp_path, project_root, stand_in, ray_driver):
    """A tuned sweep's trials go through the Ray backend like any other trials."""
    import io

    import optuna
    from rich.console import Console

    from orchestrator.commands import run_sweep
    from orchestrator.spec import load_spec
    from test_search import search_spec, studies

    stand_in.behave(**{"": {"search": {"points": 2, "step_s": 0.05}}})
    path = search_spec(tmp_path, "ray_search", {
        "metric": "val/linear_top1_cls", "sampler": "grid", "pruner": "none",
        "params": {"optimizer.lr": {"choices": [1e-3, 1e-1]}}},
        axes={"specialization": {"key": "model.specialization", "values": {"paper": "paper"}}})
    backend = cluster_backend(ray_driver, stand_in, max_parallel=2)
    outcome = run_sweep(load_spec(path), root=project_root, backend=backend, progress=False, poll_interval=0.1,
                        console=Console(file=io.StringIO()))
    backend.close()
    assert outcome.ok, outcome
    (trials,) = studies(project_root, "ray_search").values()
    assert sorted((t.params["optimizer.lr"], t.state) for t in trials) == [
        (1e-3, optuna.trial.TrialState.COMPLETE), (1e-1, optuna.trial.TrialState.COMPLETE)]
    ledger = read_ledger(project_root, "ray_search")
    assert {t["history"][-1]["job_id"] is not None for t in ledger["trials"].values()} == {True}
    assert all(t["job"] is None and t["state"] == "done" for t in ledger["trials"].values())
    assert ledger["meta"]["backend"] == "ray"
