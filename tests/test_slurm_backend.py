"""The Slurm backend, on a REAL single-node Slurm cluster (slurm/up.sh; CI's .ci/run starts it).

Without a cluster (no `sinfo` here) only the tests that need none run: sacct parsing, state
mapping, batched polling with back-off, cluster profiles, and the sbatch scripts against golden files.
On the cluster:
- a small sweep end to end with `run --detach`; the detached orchestrator SIGKILLed; `run` again
  re-attaches to the live jobs by job id and finishes them (one MLflow child per trial);
- the code snapshot (the trainer runs from <runs>/snapshots/<version>) and the torch.distributed
  environment of a 2-task job;
- a job requeued mid-training (`scontrol requeue`) resumes from its checkpoint in the same job and
  ends with one MLflow run and exactly the metrics of an uninterrupted run;
- `orchestrator cancel`: scancel, the trainer gets SIGTERM, the ledger says cancelled, nothing is left;
- failures: an unusable pretrained checkpoint is an error (not retried); a job killed by
  `scancel --signal=KILL` is transient (retried, resumes); a job over its memory is oom (transient).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import MICRO_BASE, PYTHON, REPO, make_trial, read_ledger, wait_for, write_spec

from orchestrator.backends import backend_class
from orchestrator.backends.base import JobHandle, JobStatus, Submission
from orchestrator.backends.slurm import SlurmBackend
from orchestrator.backends.slurm.resources import spec_resource_overrides, trial_resources
from orchestrator.backends.slurm.watcher import SlurmRecord, parse_sacct
from orchestrator.spec import ResourcesSpec, SlurmBackendSpec, SlurmOptions
from orchestrator.spec.profiles import load_profile
from orchestrator.store import TrialDir
from trainer.contract import is_transient

GOLDEN = Path(__file__).parent / "golden"
HAVE_SLURM = shutil.which("sinfo") is not None
needs_cluster = pytest.mark.skipif(not HAVE_SLURM, reason="no Slurm client here (`sinfo` not found); "
                                   "start the dev cluster with `sudo slurm/up.sh` (CI's .ci/run does)")

FAST_PROFILE = {  # the dev cluster, polled often (tests wait on it)
    "partition": "debug", "signal_delay_s": 60, "max_num_timeout": 5, "poll_min_s": 0.5, "poll_max_s": 2,
    "defaults": {"cpus": 1, "gpus": 0, "mem_gb": 2, "time_min": 10},
}


@pytest.fixture(scope="module")
def cluster() -> str:
    """The node's state; fails (does not skip) when Slurm is installed but the cluster is down."""
    proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True)
    states = proc.stdout.split()
    if proc.returncode != 0 or not any(s.rstrip("*") in ("idle", "mixed", "allocated", "completing") for s in states):
        pytest.fail(f"sinfo is installed but the cluster is not usable ({proc.stderr.strip() or states}); "
                    "run `sudo slurm/up.sh`")
    return states[0]


def slurm_backend(max_parallel: int = 1, *, resources: dict | None = None, poll_min_s: float | None = None,
                  poll_max_s: float | None = None, **options) -> SlurmBackend:
    """A backend as a spec with these options (and its profile, loaded as load_spec does) builds it."""
    spec = SlurmBackendSpec(max_parallel=max_parallel, resources=ResourcesSpec(**(resources or {})),
                            options=SlurmOptions(**options), profile=load_profile(options.get("profile")))
    return SlurmBackend(spec, poll_min_s=poll_min_s, poll_max_s=poll_max_s)


def profile_file(tmp_path: Path, **changes) -> Path:
    data = {**FAST_PROFILE, **changes}
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def cli(*args: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "orchestrator", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def squeue_ids() -> set[str]:
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True).stdout
    return set(out.split())


def micro(steps: int = 20, **schedule) -> dict:
    base = json.loads(json.dumps(MICRO_BASE))
    base["schedule"].update(steps=steps, **schedule)
    return base


def wait_job_done(backend: SlurmBackend, handle: JobHandle, timeout: float = 240):
    def finished():
        state = backend.poll([handle])[handle.trial_id]
        return state if state.finished else None
    return wait_for(finished, timeout=timeout, interval=0.5, what=f"job {handle.job_id} to finish")


def trial_dir(root: Path, trial) -> Path:
    d = root / "runs" / "trials" / trial.trial_id
    d.mkdir(parents=True, exist_ok=True)
    config = {**trial.config, "tracking": {"enabled": False}}
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    return d


# ----------------------------------------------------------------------------------------------
# Without a cluster
# ----------------------------------------------------------------------------------------------
def test_registry_and_sacct_parsing():
    assert backend_class("slurm") is SlurmBackend
    records = parse_sacct("12|COMPLETED|0:0\n13_0|RUNNING|0:0\n13_[1-3%2]|PENDING|0:0\n"
                          "14|CANCELLED by 0|0:15\n15|FAILED|0:9\n16|OUT_OF_MEMORY|0:125\n12.batch|COMPLETED|0:0\n")
    assert set(records) == {"12", "13_0", "13_1", "13_2", "13_3", "14", "15", "16"}
    assert records["13_2"].state == "PENDING" and records["14"] == SlurmRecord("14", "CANCELLED", 0, 15, "by 0")
    assert records["15"].exit_signal == 9 and records["16"].state == "OUT_OF_MEMORY"


def test_profiles_resources_and_spec_overrides():
    default, local, a100 = load_profile("default"), load_profile("slurm/profiles/local.yaml"), load_profile("example_a100")
    assert (local.partition, local.account) == ("debug", "cls")
    base = trial_resources(default, "base", {})
    assert (base.nodes, base.gpus_per_node, base.tasks_per_node, base.cpus_per_task) == (1, 8, 8, 10)
    huge = trial_resources(a100, "huge", {})
    assert (huge.nodes, huge.gpus_per_node, huge.tasks_per_node, huge.num_tasks) == (4, 8, 8, 32)
    assert trial_resources(local, "micro", {}).mem_mb == 2048
    # The spec's resources win where they differ from the schema defaults (what a spec writes) ...
    spec_res = ResourcesSpec(time_min=30)  # the others keep the schema defaults, unwritten
    assert spec_resource_overrides(spec_res) == {"time_min": 30}
    assert trial_resources(local, "micro", spec_resource_overrides(spec_res)).time_min == 30
    # ... exactly the keys it wrote, even where it wrote a schema default
    assert spec_resource_overrides(ResourcesSpec(mem_gb=4)) == {"mem_gb": 4}
    # Every paper sweep names a shipped profile, and its explicit resources size the jobs.
    from orchestrator.spec import load_spec

    for path in sorted((REPO / "sweeps" / "paper").glob("*.yaml")):
        spec = load_spec(path)
        backend = SlurmBackend(spec.backend)
        res = trial_resources(backend.profile, "base", backend.overrides)
        assert res.gpus_per_node == 8 and res.tasks_per_node == 8, path


def test_bad_profile_is_a_spec_error(tmp_path):
    from orchestrator.spec import SpecError

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"partiton": "gpu", "scales": {"base": {"gpu": 8}}}))
    with pytest.raises(SpecError) as err:
        load_profile(bad)
    assert "partiton: unknown key" in str(err.value) and "scales.base.gpu: unknown resource" in str(err.value)
    with pytest.raises(SpecError, match="no cluster profile 'nope'"):
        load_profile("nope")


def _normalize(text: str, tmp_path: Path) -> str:
    text = text.replace(str(tmp_path), "<TMP>").replace(shlex.quote(sys.executable), "<PYTHON>")
    return re.sub(r"arrays/[0-9a-f]{12}", "arrays/<UUID>", text)


@pytest.mark.parametrize("case", ["array_local", "multinode_a100"])
def test_sbatch_script_matches_golden(tmp_path, case):
    if case == "array_local":
        backend = slurm_backend(max_parallel=4, profile="local")
        trials = [make_trial(f"golden{i}", model={"scale": "micro"}) for i in range(2)]
    else:
        backend = slurm_backend(max_parallel=2, profile="example_a100", setup=["echo ready"])
        trials = [make_trial("golden_huge", model={"scale": "huge"})]
    items = [Submission(t, TrialDir(trial_dir(tmp_path, t))) for t in trials]
    text = _normalize(backend.sbatch_script(items), tmp_path)
    golden = GOLDEN / f"sbatch_{case}.txt"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert text == golden.read_text(), f"sbatch script changed; UPDATE_GOLDEN=1 pytest {__file__} rewrites {golden}"
    assert not list((tmp_path / "runs").rglob("*.pkl")), "a dry run leaves no pickles behind"


def test_one_sacct_per_poll_for_all_jobs_with_backoff(tmp_path, monkeypatch):
    import orchestrator.backends.slurm.watcher as watcher

    clock = [1000.0]
    calls: list[list[str]] = []
    monkeypatch.setattr(watcher.time, "monotonic", lambda: clock[0])
    states = {"100_0": "RUNNING", "100_1": "PENDING", "101": "RUNNING"}

    def fake_run(argv, timeout=60.0):
        calls.append(list(argv))
        assert argv[0] == "sacct", argv
        out = "".join(f"{j}|{s}|0:0\n" for j, s in states.items())
        return subprocess.CompletedProcess(argv, 0, out, "")

    monkeypatch.setattr(watcher, "run", fake_run)
    backend = slurm_backend(max_parallel=3, profile="local", poll_min_s=1, poll_max_s=8)
    handles = [JobHandle(f"t{j}", "slurm", j, tmp_path / j, tmp_path / j / "trainer.log", submitted_at=time.time())
               for j in states]
    first = backend.poll(handles)
    assert len(calls) == 1 and calls[0][-2:] == ["-j", "100,101"]  # arrays by base id, one call for all
    assert first == {"t100_0": first["t100_0"], "t100_1": first["t100_1"], "t101": first["t101"]}
    assert first["t100_1"].status == JobStatus.PENDING and first["t101"].status == JobStatus.RUNNING
    times = []
    for _ in range(60):  # 30 s of the runner's 0.5 s ticks, nothing changing: 1, 2, 4, 8, 8 ... s apart (cap: poll_max_s)
        clock[0] += 0.5
        before = len(calls)
        backend.poll(handles)
        if len(calls) > before:
            times.append(clock[0])
    gaps = [round(b - a, 1) for a, b in zip([1000.0] + times, times)]
    assert gaps[:5] == [1.0, 2.0, 4.0, 8.0, 8.0], gaps
    states["101"] = "COMPLETED"  # a change resets the back-off
    clock[0] += 8
    backend.poll(handles)
    clock[0] += 1
    n = len(calls)
    backend.poll(handles)
    assert len(calls) == n + 1


def test_slurm_states_map_to_job_states(tmp_path):
    backend = slurm_backend(max_parallel=1, profile="local")
    backend.result_grace_s = 0

    def state(slurm_state, exit_sig=0, result=None, trainer_exit=None, log_err="", age=0.0):
        run_dir = tmp_path / f"d{len(list(tmp_path.iterdir()))}"
        (run_dir / "slurm").mkdir(parents=True)
        if result is not None:
            (run_dir / "result.json").write_text(json.dumps(result))
        if trainer_exit is not None:
            (run_dir / "slurm" / "7.json").write_text(json.dumps({"trainer_exit": trainer_exit}))
        (run_dir / "slurm" / "7_0_log.err").write_text(log_err)
        handle = JobHandle("t", "slurm", "7", run_dir, run_dir / "trainer.log", submitted_at=time.time() - age)
        backend.watcher.records = {"7": SlurmRecord("7", slurm_state, 0, exit_sig)} if slurm_state else {}
        backend._first_seen.clear()
        s = backend._state_for(handle)
        return (s.status.value, s.failure_class)

    assert state("PENDING") == state("REQUEUED") == state("PREEMPTED") == ("pending", None)
    assert state("RUNNING") == state("COMPLETING") == ("running", None)
    assert state("COMPLETED", result={"status": "done"}) == ("done", None)
    assert state("FAILED", result={"status": "failed", "failure_class": "nan"}) == ("failed", "nan")
    assert state("FAILED", trainer_exit=2) == ("failed", "error")
    assert state("FAILED", trainer_exit=1) == ("failed", "error")
    assert state("FAILED", trainer_exit=75) == ("failed", "preempted")
    assert state("FAILED", exit_sig=9) == ("failed", "killed")
    assert state("FAILED", exit_sig=9, log_err="StepId=7.batch exceeded memory limit") == ("failed", "oom")
    assert state("OUT_OF_MEMORY") == ("failed", "oom")
    assert state("TIMEOUT") == ("failed", "timeout")
    assert state("CANCELLED") == ("failed", "killed")
    assert state("NODE_FAIL") == ("failed", "lost")
    assert state("COMPLETED") == ("failed", "error")  # exited 0 without a result
    assert state(None) == ("pending", None)  # not in sacct yet
    assert state(None, age=3600) == ("failed", "lost")
    assert all(is_transient(c) for c in ("oom", "killed", "preempted", "timeout", "lost"))


# ----------------------------------------------------------------------------------------------
# On the cluster
# ----------------------------------------------------------------------------------------------
PROBE = r'''
import json, os, sys
from pathlib import Path
out = Path(sys.argv[sys.argv.index("--out") + 1])
import trainer
keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")
info = {k: os.environ.get(k) for k in keys} | {"trainer_file": trainer.__file__}
(out / f"probe_{info['RANK']}.json").write_text(json.dumps(info))
if info["RANK"] == "0":
    (out / "result.json").write_text(json.dumps({"status": "done", "metrics": {}}))
'''


@needs_cluster
def test_snapshot_and_distributed_env_of_a_two_task_job(tmp_path, cluster):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    profile = profile_file(tmp_path, scales={"micro": {"cpus": 2, "tasks_per_node": 2, "mem_gb": 1, "time_min": 5}})
    backend = slurm_backend(max_parallel=1, profile=str(profile), command=f"{PYTHON} {probe}")
    trial = make_trial("probe", model={"scale": "micro"})
    run_dir = trial_dir(tmp_path, trial)
    handle = backend.submit(trial, TrialDir(run_dir))
    assert wait_job_done(backend, handle, timeout=120).status == JobStatus.DONE
    backend.watcher.refresh([handle.job_id])
    assert backend.watcher.records[handle.job_id].state == "COMPLETED"
    snapshot = Path(handle.info["snapshot"])
    assert snapshot.parent == tmp_path / "runs" / "snapshots" and (snapshot / "pyproject.toml").is_file()
    from orchestrator.identity import code_version

    assert snapshot.name == code_version() == handle.info["code_version"]
    ranks = [json.loads((run_dir / f"probe_{r}.json").read_text()) for r in (0, 1)]
    for rank, info in enumerate(ranks):
        assert Path(info["trainer_file"]).is_relative_to(snapshot), info  # not the live checkout
        assert (info["RANK"], info["WORLD_SIZE"], info["LOCAL_RANK"]) == (str(rank), "2", str(rank))
        assert info["OMP_NUM_THREADS"] == "1"
    assert ranks[0]["MASTER_ADDR"] == ranks[1]["MASTER_ADDR"] and ranks[0]["MASTER_PORT"] == ranks[1]["MASTER_PORT"]
    logs = sorted(p.name for p in (run_dir / "slurm").iterdir())
    assert f"{handle.job_id}_0_log.out" in logs and f"{handle.job_id}_submission.sh" in logs
    assert f"{handle.job_id}.json" in logs and "slurm job" in (run_dir / "trainer.log").read_text()


@needs_cluster
def test_trials_submitted_together_go_out_as_one_job_array(tmp_path, cluster):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    backend = slurm_backend(max_parallel=3, profile=str(profile_file(tmp_path)), array_parallelism=2,
                            command=f"{PYTHON} {probe}")
    trials = [make_trial(f"array{i}", model={"scale": "micro"}) for i in range(3)]
    handles = backend.submit_many([Submission(t, TrialDir(trial_dir(tmp_path, t))) for t in trials])
    base = handles[0].info["array_job_id"]
    assert [h.job_id for h in handles] == [f"{base}_{i}" for i in range(3)]
    assert backend.active == 3 and backend.free_slots == 0
    for handle in handles:
        assert wait_job_done(backend, handle, timeout=120).status == JobStatus.DONE
        folder = handle.run_dir / "slurm"
        assert (folder / f"{handle.job_id}_0_log.out").is_file()  # written through the %a symlink
        assert (folder / f"{handle.job_id}_submitted.pkl").is_file()
        script = (folder / f"{base}_submission.sh").read_text()
        assert "#SBATCH --array=0-2%2" in script and "#SBATCH --job-name=cls-array0-x3" in script
    assert backend.active == 0


@needs_cluster
@pytest.mark.slow
def test_sweep_end_to_end_detached_then_reattached(tmp_path, project_root, mlflow_db, cli_env, cluster):
    from test_orchestrator_e2e import assert_one_complete_child_per_trial

    profile = profile_file(tmp_path)
    spec = write_spec(tmp_path, "slurm_e2e", base=micro(steps=100, checkpoint_every=20, log_every=20),
                      backend={"kind": "slurm", "max_parallel": 2, "retries": 1, "options": {"profile": str(profile)}})
    started = cli("run", str(spec), "--detach", "--no-report", env=cli_env, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    pid = int(re.search(r"background \(pid (\d+)\)", started.stdout).group(1))

    def both_running():
        trials = read_ledger(project_root, "slurm_e2e")["trials"].values()
        jobs = [t["job"]["job_id"] for t in trials if t["state"] == "running" and t.get("job")]
        return jobs if len(jobs) == 2 and set(jobs) <= squeue_ids() else None

    jobs = wait_for(both_running, timeout=120, interval=0.2, what="two submitted jobs")
    os.kill(pid, signal.SIGKILL)  # the orchestrator dies; the Slurm jobs do not
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2],
             timeout=10, what="the orchestrator gone")
    assert set(jobs) <= squeue_ids()

    rerun = cli("run", str(spec), "--no-report", "--no-progress", env=cli_env)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert rerun.stdout.count("reattached") == 2, rerun.stdout
    ledger = read_ledger(project_root, "slurm_e2e")
    assert {t["state"] for t in ledger["trials"].values()} == {"done"}
    for trial in ledger["trials"].values():
        assert trial["attempts"] == 1 and len(trial["history"]) == 1, trial
        assert trial["note"] and "reattached" in trial["note"], trial["note"]
        run_dir = Path(trial["run_dir"])
        job_id = trial["history"][0]["job_id"]
        assert (run_dir / "slurm" / f"{job_id}_0_log.out").exists(), sorted(os.listdir(run_dir / "slurm"))
    assert sorted(h["job_id"] for t in ledger["trials"].values() for h in t["history"]) == sorted(jobs)
    assert_one_complete_child_per_trial(mlflow_db, "slurm_e2e", ledger)
    assert not set(jobs) & squeue_ids()


@needs_cluster
@pytest.mark.slow
def test_requeue_mid_training_resumes_with_one_mlflow_run_and_same_metrics(tmp_path, project_root, mlflow_db,
                                                                            cli_env, cluster):
    from mlflow.tracking import MlflowClient

    profile = profile_file(tmp_path)
    spec = write_spec(tmp_path, "slurm_requeue", base=micro(steps=80, checkpoint_every=10, log_every=10),
                      axes={"specialization": {"key": "model.specialization", "values": {"paper": "paper"}}},
                      backend={"kind": "slurm", "max_parallel": 1, "retries": 0, "options": {"profile": str(profile)}})
    proc = subprocess.Popen([PYTHON, "-m", "orchestrator", "run", str(spec), "--no-report", "--no-progress"],
                            cwd=REPO, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def mid_training():
            assert proc.poll() is None, proc.communicate()[0]
            for t in read_ledger(project_root, "slurm_requeue")["trials"].values():
                log = Path(t["run_dir"]) / "trainer.log"
                if t["state"] == "running" and log.exists() and "step 20/80" in log.read_text():
                    return t
            return None

        trial = wait_for(mid_training, timeout=180, interval=0.2, what="training past step 20")
        run_dir, job_id = Path(trial["run_dir"]), trial["job"]["job_id"]
        requeued_at, requeued_wall = time.monotonic(), time.time()
        subprocess.run(["scontrol", "requeue", job_id], check=True)
        # Meanwhile: the same trial, uninterrupted, straight from the trainer (the reference).
        reference_dir = tmp_path / "reference"
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        config["tracking"] = {"enabled": False}
        (tmp_path / "reference.yaml").write_text(yaml.safe_dump(config))
        reference = subprocess.Popen([PYTHON, "-m", "trainer", "--config", str(tmp_path / "reference.yaml"),
                                      "--out", str(reference_dir)], cwd=REPO, env=cli_env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_for(lambda: "resumed from" in (run_dir / "trainer.log").read_text(), timeout=180, interval=0.2,
                 what="the requeued job to resume")
        latency = time.monotonic() - requeued_at
        reference_out, _ = reference.communicate(timeout=300)
        assert reference.returncode == 0, reference_out[-3000:]
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    restarted = re.search(r"===== (\S+ \S+) slurm job \S+ restart 1", (run_dir / "trainer.log").read_text())
    restart_s = time.mktime(time.strptime(restarted.group(1), "%Y-%m-%d %H:%M:%S")) - requeued_wall
    print(f"scontrol requeue -> job running again {restart_s:.0f} s -> trainer resumed {latency:.1f} s")
    log = (run_dir / "trainer.log").read_text()
    stopped = re.search(r"stopped by signal 15 at step (\d+)", log)
    resumed = re.search(r"resumed from \S+ at step (\d+)", log)
    assert "restart 1" in log and stopped and resumed, log[-3000:]
    assert stopped.group(1) == resumed.group(1) and int(stopped.group(1)) < 80  # exactly where it stopped
    ledger = read_ledger(project_root, "slurm_requeue")
    record = ledger["trials"][trial["trial_id"]]
    assert record["state"] == "done" and record["attempts"] == 1  # the same job, not a retry
    assert [h["job_id"] for h in record["history"]] == [job_id]
    result = json.loads((run_dir / "result.json").read_text())
    expected = json.loads((reference_dir / "result.json").read_text())
    assert result["metrics"] == expected["metrics"] and result["steps"] == expected["steps"] == 80
    client = MlflowClient(tracking_uri=f"sqlite:///{mlflow_db}")
    experiment = client.get_experiment_by_name("slurm_requeue")
    children = [r for r in client.search_runs([experiment.experiment_id])
                if r.data.tags.get("trial_id") == trial["trial_id"]]
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    assert children[0].info.run_id == result["mlflow_run_id"]
    assert children[0].data.metrics["linear_top1_cls"] == pytest.approx(result["metrics"]["linear_top1_cls"])


STOPPABLE = r"""
import json, signal, sys, time
from pathlib import Path
out = Path(sys.argv[sys.argv.index("--out") + 1])
starts = out / "starts"
n = int(starts.read_text()) + 1 if starts.exists() else 1
starts.write_text(str(n))
if n > 1:  # resumed: finish
    (out / "result.json").write_text(json.dumps({"status": "done", "metrics": {"starts": n}}))
    sys.exit(0)
def stop(signum, frame):
    (out / "stopped_by").write_text(str(signum))
    sys.exit(75)  # like the trainer: checkpoint saved, run again to resume
signal.signal(signal.SIGUSR1, stop)
signal.signal(signal.SIGTERM, stop)
(out / "ready").write_text("1")
time.sleep(300)
"""


@needs_cluster
@pytest.mark.slow
def test_time_limit_signal_checkpoints_the_trainer_and_requeues_the_same_job(tmp_path, cluster):
    script = tmp_path / "stoppable.py"
    script.write_text(STOPPABLE)
    backend = slurm_backend(max_parallel=1, profile=str(profile_file(tmp_path)), command=f"{PYTHON} {script}")
    trial = make_trial("stoppable", model={"scale": "micro"})
    run_dir = trial_dir(tmp_path, trial)
    handle = backend.submit(trial, TrialDir(run_dir))
    wait_for(lambda: (run_dir / "ready").exists(), timeout=60, what="the job to start")
    # What Slurm sends `signal_delay_s` before the time limit (and what submitit listens for).
    subprocess.run(["scancel", "--signal=USR2", handle.job_id], check=True)
    seen = []

    def done():
        state = backend.poll([handle])[trial.trial_id]
        seen.append(state.status)
        return state if state.finished else None

    final = wait_for(done, timeout=180, interval=0.5, what="the requeued job to finish")
    assert final.status == JobStatus.DONE and JobStatus.PENDING in seen, seen
    assert (run_dir / "stopped_by").read_text() == str(int(signal.SIGUSR1))  # forwarded, not killed by USR2
    assert (run_dir / "starts").read_text() == "2"
    attempt = json.loads((run_dir / "slurm" / f"{handle.job_id}.json").read_text())
    assert attempt["restart_count"] == 1 and attempt["trainer_exit"] == 0  # the same job id, restarted
    log = (run_dir / "slurm" / f"{handle.job_id}_0_log.err").read_text()
    assert "Caught signal SIGUSR2" in log and "DUE TO JOB REQUEUE" in log, log


@needs_cluster
def test_cancel_scancels_the_jobs_and_records_them_cancelled(tmp_path, project_root, stand_in, cli_env, cluster):
    stand_in.behave(case={"sleep": 300})
    profile = profile_file(tmp_path)
    spec = write_spec(tmp_path, "slurm_cancel", base=MICRO_BASE, tracking={"enabled": False},
                      axes={"case": {"key": "model.specialization", "values": {"a": "none", "b": "paper"}}},
                      backend={"kind": "slurm", "max_parallel": 2, "options": {"profile": str(profile)}})
    started = cli("run", str(spec), "--detach", "--no-report", env=cli_env, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr

    def both_sleeping():
        trials = [t for t in read_ledger(project_root, "slurm_cancel")["trials"].values() if t["state"] == "running"]
        return trials if len(trials) == 2 and len(stand_in.events("start")) == 2 else None

    trials = wait_for(both_sleeping, timeout=120, interval=0.2, what="two stand-in trainers running in Slurm")
    jobs = {t["job"]["job_id"] for t in trials}
    cancelled = cli("cancel", str(spec), env=cli_env, timeout=200)
    assert cancelled.returncode == 0 and "stopped orchestrator" in cancelled.stdout, cancelled.stdout + cancelled.stderr
    ledger = read_ledger(project_root, "slurm_cancel")
    assert {t["state"] for t in ledger["trials"].values()} == {"cancelled"}
    assert not jobs & squeue_ids(), "jobs still queued or running"
    assert len(stand_in.events("sigterm")) == 2  # each trainer was told to checkpoint before it ended

    def cancelled_in_accounting():  # slurmdbd writes job records asynchronously
        states = subprocess.run(["sacct", "-X", "-n", "-P", "--format", "JobID,State", "-j", ",".join(sorted(jobs))],
                                capture_output=True, text=True).stdout
        return states if states.count("CANCELLED") == 2 else None

    wait_for(cancelled_in_accounting, timeout=60, interval=1, what="sacct to record both jobs CANCELLED")


@needs_cluster
@pytest.mark.slow
def test_errors_are_not_retried_but_killed_jobs_are(tmp_path, project_root, cli_env, cluster):
    profile = profile_file(tmp_path)
    # A file the up-front check finds (it exists) but the trainer cannot use: an error at run time.
    broken = tmp_path / "vit_micro.pth"
    torch.save([1, 2, 3], broken)
    spec = write_spec(tmp_path, "slurm_failures", base=micro(steps=100, checkpoint_every=10, log_every=10),
                      tracking={"enabled": False},
                      axes={"weights": {"key": "model.pretrained",
                                        "values": {"broken": str(broken), "scratch": None}}},
                      backend={"kind": "slurm", "max_parallel": 2, "retries": 2, "options": {"profile": str(profile)}})
    proc = subprocess.Popen([PYTHON, "-m", "orchestrator", "run", str(spec), "--no-report", "--no-progress"],
                            cwd=REPO, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def scratch_training():
            assert proc.poll() is None, proc.communicate()[0]
            for t in read_ledger(project_root, "slurm_failures")["trials"].values():
                log = Path(t["run_dir"]) / "trainer.log"
                if t["cell"]["weights"] == "scratch" and t["state"] == "running" and log.exists() \
                        and "step 20/100" in log.read_text():
                    return t
            return None

        victim = wait_for(scratch_training, timeout=180, interval=0.2, what="the scratch trial training")
        subprocess.run(["scancel", "--signal=KILL", "--full", victim["job"]["job_id"]], check=True)
        out, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, out  # one trial failed for good
    trials = {t["cell"]["weights"]: t for t in read_ledger(project_root, "slurm_failures")["trials"].values()}
    broken, scratch = trials["broken"], trials["scratch"]
    assert (broken["state"], broken["failure_class"], broken["attempts"]) == ("failed", "error", 1), broken
    assert "vit_micro.pth" in (broken["error"] or ""), broken["error"]
    assert scratch["state"] == "done" and scratch["attempts"] == 2, scratch
    assert scratch["history"][0]["failure_class"] == "killed", scratch["history"]
    assert scratch["history"][0]["job_id"] != scratch["history"][1]["job_id"]
    assert "resumed from" in (Path(scratch["run_dir"]) / "trainer.log").read_text()


@needs_cluster
def test_memory_limit_exceeded_is_oom_and_transient(tmp_path, cluster):
    backend = slurm_backend(max_parallel=1, resources={"mem_gb": 0.15}, profile=str(profile_file(tmp_path)))
    trial = make_trial("hog", **micro())
    run_dir = trial_dir(tmp_path, trial)
    handle = backend.submit(trial, TrialDir(run_dir))
    assert handle.info["resources"]["mem_mb"] == 154
    state = wait_job_done(backend, handle, timeout=120)
    assert (state.status, state.failure_class) == (JobStatus.FAILED, "oom"), state
    assert is_transient(state.failure_class)


@needs_cluster
@pytest.mark.slow
def test_a_search_runs_its_trials_as_slurm_jobs(tmp_path, project_root, stand_in, cli_env, cluster):
    """A tuned sweep's trials are Slurm jobs like any other; the pruner stops one with scancel."""
    import optuna

    from test_search import search_spec, studies

    stand_in.behave(**{"": {"search": {"points": 8, "step_s": 0.5}}})
    profile = profile_file(tmp_path)
    spec = search_spec(tmp_path, "slurm_search", {
        "metric": "val/linear_top1_cls", "sampler": "grid", "pruner": "median", "pruner_startup_trials": 1,
        "params": {"optimizer.lr": {"choices": [1e-3, 1e-7]}}},
        axes={"specialization": {"key": "model.specialization", "values": {"paper": "paper"}}},
        backend={"kind": "slurm", "max_parallel": 1, "options": {"profile": str(profile)}})
    done = cli("run", str(spec), "--no-report", env=cli_env, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    (trials,) = studies(project_root, "slurm_search").values()
    states = {t.params["optimizer.lr"]: t.state for t in trials}
    assert states == {1e-3: optuna.trial.TrialState.COMPLETE, 1e-7: optuna.trial.TrialState.PRUNED}, states
    ledger = read_ledger(project_root, "slurm_search")
    assert ledger["meta"]["backend"] == "slurm"
    pruned = [t for t in ledger["trials"].values() if t["state"] == "pruned"]
    assert len(pruned) == 1 and (Path(pruned[0]["run_dir"]) / "got_sigterm").exists()
