"""The local backend: subprocess per trial, slots, logs, exit-code/result mapping, cancel, reattach."""

from __future__ import annotations

import json
import os
import time

import pytest

from orchestrator.backends import BackendError, JobStatus, backend_class, get_backend
from orchestrator.backends.local import LocalBackend
from orchestrator.spec import LocalBackendSpec, LocalOptions, ResourcesSpec
from trainer.contract import PID_FILE

from conftest import make_trial, pid_alive, submit, wait_finished, wait_for


def local_backend(max_parallel: int = 1, **options) -> LocalBackend:
    return LocalBackend(LocalBackendSpec(max_parallel=max_parallel, options=LocalOptions(**options)))


def test_registry_finds_local_and_names_unknown_backends():
    assert backend_class("local") is LocalBackend
    with pytest.raises(BackendError, match="no backend named 'nomad'"):
        backend_class("nomad")

    backend = get_backend(LocalBackendSpec(max_parallel=3, retries=0, resources=ResourcesSpec(cpus_per_trial=2)))
    assert (backend.max_parallel, backend.cpus_per_trial) == (3, 2)


def test_slots_logs_and_threads_per_trial(tmp_path, stand_in):
    stand_in.behave(slow={"sleep": 0.5})
    backend = local_backend(max_parallel=2, command=stand_in.command)
    first, second = make_trial("slow-a"), make_trial("slow-b")
    handles = [submit(backend, first, tmp_path), submit(backend, second, tmp_path)]
    assert backend.free_slots == 0
    with pytest.raises(BackendError, match="full"):
        submit(backend, make_trial("slow-c"), tmp_path)
    assert {s.status for s in backend.poll(handles).values()} == {JobStatus.RUNNING}

    states = wait_finished(backend, handles)
    assert {s.status for s in states.values()} == {JobStatus.DONE}
    assert backend.free_slots == 2
    for trial in (first, second):
        log = (tmp_path / trial.trial_id / "trainer.log").read_text()
        assert f"stand-in trainer for {trial.config['name']} attempt 1" in log  # its own log, nobody else's
        assert "orchestrator:" in log  # the per-attempt header
        result = json.loads((tmp_path / trial.trial_id / "result.json").read_text())
        assert result["threads"] == "1"  # OMP_NUM_THREADS = cpus_per_trial


@pytest.mark.parametrize("fail, status, failure_class", [
    ("nan", JobStatus.FAILED, "nan"),
    ("oom", JobStatus.FAILED, "oom"),
    ("crash", JobStatus.FAILED, "error"),
    ("signal", JobStatus.FAILED, "killed"),
    ("exit0", JobStatus.FAILED, "error"),
    (None, JobStatus.DONE, None),
])
def test_exit_codes_and_results_map_to_states(tmp_path, stand_in, fail, status, failure_class):
    stand_in.behave(case={"fail": fail} if fail else {})
    backend = local_backend(max_parallel=1, command=stand_in.command)
    handle = submit(backend, make_trial("case"), tmp_path)
    state = wait_finished(backend, [handle])[handle.trial_id]
    assert (state.status, state.failure_class) == (status, failure_class)
    if fail == "crash":
        assert "exit code 3" in state.error and "stand-in crash" in state.error  # the log's last line
    if fail == "signal":
        assert state.error == "killed by SIGKILL"


def test_cancel_stops_the_whole_process_group_sigterm_first(tmp_path, stand_in):
    stand_in.behave(long={"sleep": 60, "grandchild": True})
    backend = local_backend(max_parallel=2, command=stand_in.command, grace_s=5)
    trial = make_trial("long")
    handle = submit(backend, trial, tmp_path)
    run_dir = tmp_path / trial.trial_id
    grandchild = int(wait_for(lambda: (run_dir / "grandchild.pid").exists() and (run_dir / "grandchild.pid").read_text(),
                              what="grandchild"))
    assert pid_alive(grandchild)

    started = time.monotonic()
    backend.cancel(handle)
    assert time.monotonic() - started < 5  # the trainer stopped at SIGTERM, no need to wait out the grace
    assert (run_dir / "got_sigterm").exists()  # asked politely first (the trainer checkpoints on SIGTERM)
    assert not pid_alive(handle.info["pid"])
    wait_for(lambda: not pid_alive(grandchild), timeout=5, what="grandchild killed with its group")
    assert backend.active == 0


def test_cancel_escalates_to_sigkill_after_the_grace_period(tmp_path, stand_in):
    stand_in.behave(stubborn={"sleep": 60, "ignore_sigterm": True})
    backend = local_backend(max_parallel=1, command=stand_in.command, grace_s=0.5)
    handle = submit(backend, make_trial("stubborn"), tmp_path)
    wait_for(lambda: stand_in.events("start"), what="start")
    time.sleep(0.2)  # let it install SIG_IGN
    backend.cancel(handle)
    assert not pid_alive(handle.info["pid"])


def test_reattach_after_a_restart_and_pid_reuse_safety(tmp_path, stand_in):
    stand_in.behave(medium={"sleep": 2})
    first = local_backend(max_parallel=1, command=stand_in.command)
    trial = make_trial("medium")
    handle = submit(first, trial, tmp_path)
    saved = json.loads(json.dumps(handle.to_dict()))  # what the ledger keeps

    # A new orchestrator process (a new backend) finds the same live process again.
    second = local_backend(max_parallel=1, command=stand_in.command)
    again = second.reattach(saved)
    assert again is not None and again.job_id == handle.job_id and second.active == 1
    assert second.poll([again])[trial.trial_id].status == JobStatus.RUNNING

    # The same pid with another start time is a recycled pid: not ours, never touched.
    recycled = {**saved, "info": {**saved["info"], "start_ticks": saved["info"]["start_ticks"] + 1}}
    assert local_backend().reattach(recycled) is None
    # A pid file naming another process means the run dir was taken over: not ours either.
    pid_file = tmp_path / trial.trial_id / PID_FILE
    original = pid_file.read_text()
    pid_file.write_text(json.dumps({**json.loads(original), "pid": 1}))
    assert local_backend().reattach(saved) is None
    pid_file.write_text(original)

    state = wait_finished(second, [again])[trial.trial_id]
    assert state.status == JobStatus.DONE  # read from result.json: the exit code of a non-child is unknown
    first.poll([handle])  # reap our zombie child
    assert local_backend().reattach(saved) is None  # gone now


def test_vanished_process_without_result_is_lost(tmp_path, stand_in):
    stand_in.behave(doomed={"sleep": 60})
    first = local_backend(max_parallel=1, command=stand_in.command)
    trial = make_trial("doomed")
    handle = submit(first, trial, tmp_path)
    second = local_backend(max_parallel=1)
    adopted = second.reattach(handle.to_dict())
    os.killpg(handle.info["pgid"], 9)
    first.poll([handle])  # reap
    state = wait_finished(second, [adopted])[trial.trial_id]
    assert (state.status, state.failure_class) == (JobStatus.FAILED, "lost")
