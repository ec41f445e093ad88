"""The runner and the CLI with the stand-in trainer: retries, skips, dedup, signals, restarts, errors.

The stand-in (tests/conftest.py) replaces only the trainer subprocess; ledger, locks, backend,
MLflow store and CLI are the real ones.
"""

from __future__ import annotations

import io
import signal
import subprocess
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from orchestrator.cli import main
from orchestrator.commands import run_sweep
from orchestrator.plan import estimate_train_flops
from orchestrator.spec import expand, load_spec

from conftest import MICRO_BASE, PYTHON, REPO, orchestrator_env, pid_alive, read_ledger, wait_for, write_spec

CASES = {"ok": "none", "nan": "norms", "oom": "paper", "flaky": "qkv@first_third", "five": "ls"}


def spec_file(folder: Path, name: str, cases: list[str], *, tracking: bool = False, **kwargs) -> Path:
    axes = {"case": {"key": "model.specialization", "values": {c: CASES[c] for c in cases}}}
    return write_spec(folder, name, axes=axes, tracking=None if tracking else {"enabled": False}, **kwargs)


def run(path: Path, *overrides: str, **kwargs):
    spec = load_spec(path, overrides)
    kwargs = {"progress": False, "poll_interval": 0.05, "retry_delay_s": 0.05, "report": False,
              "console": Console(file=io.StringIO()), **kwargs}
    return run_sweep(spec, **kwargs)


def trials_by_case(root: Path, sweep: str) -> dict[str, dict]:
    return {t["cell"]["case"]: t for t in read_ledger(root, sweep)["trials"].values()}


def starts_per_case(stand_in) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in stand_in.events("start"):
        case = e["name"].split("case=")[1].split()[0]
        counts[case] = counts.get(case, 0) + 1
    return counts


# ----------------------------------------------------------------------------------------------
# Runner
# ----------------------------------------------------------------------------------------------
def test_retries_transient_failures_only_and_within_budget(tmp_path, project_root, stand_in):
    stand_in.behave(**{"case=nan": {"fail": "nan"}, "case=oom": {"fail": "oom"},
                       "case=flaky": {"fail": "signal", "fail_times": 1}})
    path = spec_file(tmp_path, "retry", ["ok", "nan", "oom", "flaky"], backend={"retries": 2})
    outcome = run(path)

    trials = trials_by_case(project_root, "retry")
    assert {c: t["state"] for c, t in trials.items()} == {"ok": "done", "nan": "failed", "oom": "failed",
                                                          "flaky": "done"}
    assert {c: t["attempts"] for c, t in trials.items()} == {"ok": 1, "nan": 1, "oom": 3, "flaky": 2}
    assert trials["oom"]["failure_class"] == "oom" and trials["nan"]["failure_class"] == "nan"
    assert [h["failure_class"] for h in trials["flaky"]["history"]] == ["killed", None]
    assert starts_per_case(stand_in) == {"ok": 1, "nan": 1, "oom": 3, "flaky": 2}
    assert sorted(outcome.failed) == sorted([trials["nan"]["trial_id"], trials["oom"]["trial_id"]])
    assert not outcome.ok and outcome.counts["done"] == 2


def test_rerun_skips_finished_trials_and_retry_failed_reopens_failures(tmp_path, project_root, stand_in):
    stand_in.behave(**{"case=nan": {"fail": "nan", "fail_times": 1}})
    path = spec_file(tmp_path, "rerun", ["ok", "nan"])
    run(path)
    run(path)  # nothing to do: done stays done, a NaN is not transient
    assert starts_per_case(stand_in) == {"ok": 1, "nan": 1}
    assert trials_by_case(project_root, "rerun")["nan"]["state"] == "failed"

    outcome = run(path, retry_failed=True)
    assert starts_per_case(stand_in) == {"ok": 1, "nan": 2}
    assert outcome.ok


def test_identical_trials_are_shared_across_sweeps(tmp_path, project_root, stand_in):
    first = spec_file(tmp_path, "first", ["ok", "oom"])  # oom is just a label here: no failure asked
    second = spec_file(tmp_path, "second", ["oom", "five"])
    run(first)
    outcome = run(second)
    assert outcome.ok
    assert starts_per_case(stand_in) == {"ok": 1, "oom": 1, "five": 1}  # `oom` trained once, for both
    a, b = trials_by_case(project_root, "first"), trials_by_case(project_root, "second")
    assert a["oom"]["trial_id"] == b["oom"]["trial_id"] and a["oom"]["run_dir"] == b["oom"]["run_dir"]
    assert b["oom"]["reused"] and b["oom"]["attempts"] == 0 and not b["five"]["reused"]


def test_max_parallel_is_respected(tmp_path, project_root, stand_in):
    stand_in.behave(case={"sleep": 0.4})
    path = spec_file(tmp_path, "parallel", ["ok", "nan", "oom", "flaky", "five"], backend={"max_parallel": 2})
    assert run(path).ok
    assert stand_in.max_concurrency() == 2
    assert {e["threads"] for e in stand_in.events("start")} == {"1"}  # cpus_per_trial from the spec


def test_mlflow_one_parent_one_child_per_trial_across_reruns(tmp_path, project_root, stand_in, mlflow_db):
    from mlflow.tracking import MlflowClient

    stand_in.behave(five={"curve": 3})  # "five" keeps a training curve in its metrics.jsonl
    path = spec_file(tmp_path, "tracked", ["ok", "five"], tracking=True)
    first = run(path)
    client = MlflowClient(tracking_uri=f"sqlite:///{mlflow_db}")

    def runs():
        experiment = client.get_experiment_by_name("tracked")
        return client.search_runs([experiment.experiment_id])

    parents = [r for r in runs() if r.data.tags.get("sweep_role") == "parent"]
    children = [r for r in runs() if r.data.tags.get("mlflow.parentRunId")]
    assert [p.info.run_id for p in parents] == [first.parent_run_id] and parents[0].info.status == "FINISHED"
    assert len(children) == 2
    for child in children:  # the stand-in logs nothing: the runner's sync filled it from result.json
        assert child.data.metrics["linear_top1_cls"] == pytest.approx(0.51)
        assert child.data.metrics["tokens/cos_post"] == pytest.approx(0.1)  # '@' made MLflow-safe
        assert child.data.params["model.scale"] == "micro" and child.info.status == "FINISHED"
        assert child.data.tags["trial_id"] in {t["trial_id"] for t in trials_by_case(project_root, "tracked").values()}

    # Re-run one trial (its result vanished): the runner hands the trainer its existing child run.
    ok = trials_by_case(project_root, "tracked")["ok"]
    (Path(ok["run_dir"]) / "result.json").unlink()
    second = run(path)
    config = yaml.safe_load((Path(ok["run_dir"]) / "config.yaml").read_text())
    child_of_ok = [c for c in children if c.data.tags["trial_id"] == ok["trial_id"]][0]
    assert config["tracking"]["run_id"] == child_of_ok.info.run_id
    assert config["tracking"]["parent_run_id"] == first.parent_run_id == second.parent_run_id
    assert main(["sync", str(path)]) == 0
    assert len(runs()) == 3  # still one parent and two children

    # Another sweep reusing a finished trial gets its own child run, tagged with where it came from.
    other = spec_file(tmp_path, "other", ["five"], tracking=True)
    run(other)
    reused = client.search_runs([client.get_experiment_by_name("other").experiment_id],
                                filter_string="tags.synced_from = 'result.json'")
    assert len(reused) == 1 and reused[0].data.metrics["knn_top1"] == pytest.approx(0.4)
    curve = client.get_metric_history(reused[0].info.run_id, "train/loss")  # the source's curve too
    assert sorted((m.step, m.value) for m in curve) == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]


# ----------------------------------------------------------------------------------------------
# CLI: in process where possible; real orchestrator processes where signals, restarts and
# concurrency are the point
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["run", "plan", "status", "sync", "cancel"])
def test_invalid_spec_exits_2_and_writes_nothing(tmp_path, project_root, capsys, command):
    bad = write_spec(tmp_path, "bad", base={**MICRO_BASE, "model": {"scael": "micro"}},
                     axes={"case": {"key": "model.specialisation", "values": {"a": 1}}})
    assert main([command, str(bad), "--set", "backend.max_parallel=0"]) == 2
    err = capsys.readouterr().err
    assert "invalid sweep spec" in err and "nothing was run" in err
    assert "scael" in err and "specialisation" in err and "max_parallel" in err  # every problem at once
    assert list(project_root.iterdir()) == []


def test_run_refuses_files_a_trial_would_miss_but_plan_does_not(tmp_path, project_root, capsys):
    missing = tmp_path / "nope.pth"
    spec = write_spec(tmp_path, "files", base=MICRO_BASE,
                      axes={"init": {"key": "model.pretrained", "values": {"scratch": None, "ckpt": str(missing)}}})
    assert main(["run", str(spec)]) == 2
    err = "".join(capsys.readouterr().err.split())  # the console wraps long lines: compare without spaces
    expected = f"axes.init.values.ckpt: model.pretrained: {missing} does not exist"
    assert "nothingwasrun" in err and "".join(expected.split()) in err
    assert list(project_root.iterdir()) == []
    assert main(["plan", str(spec)]) == 0  # planning works where the data is not (a laptop, a login node)


@pytest.mark.parametrize("path", sorted((REPO / "sweeps" / "paper").glob("*.yaml")), ids=lambda p: p.stem)
def test_paper_sweeps_plan_with_the_dinov2_protocol(path, project_root, capsys):
    assert main(["plan", str(path)]) == 0
    assert "new, 0 kept, 0 gone" in capsys.readouterr().out
    assert {t.config["evaluation"]["protocol"] for t in expand(load_spec(path), "v")} == {"dinov2"}
    assert list(project_root.iterdir()) == []


def test_missing_spec_and_bad_override_exit_2(tmp_path, project_root, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "no such sweep spec file" in capsys.readouterr().err
    good = spec_file(tmp_path, "good", ["ok"])
    assert main(["plan", str(good), "--set", "seeds"]) == 2
    assert list(project_root.iterdir()) == []


def test_plan_and_status_tables(tmp_path, project_root, stand_in, capsys):
    path = spec_file(tmp_path, "shown", ["ok", "nan"])
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "2 new, 0 kept, 0 gone" in out and "case=ok seed=0" in out and "train TFLOP" in out
    assert list(project_root.iterdir()) == []  # plan only reads

    stand_in.behave(**{"case=nan": {"fail": "nan"}})
    run(path)
    assert main(["plan", str(path), "--set", "seeds=[0,1]"]) == 0
    out = capsys.readouterr().out
    assert "2 new, 2 kept, 0 gone" in out and "est. time" in out
    assert "from 1 finished trial" not in out  # the stand-in leaves no config.resolved.yaml: no time basis
    assert main(["status", str(path)]) == 0
    out = capsys.readouterr().out
    assert "done 1" in out and "failed 1" in out and "nan: stand-in nan" in out and "no orchestrator running" in out


def test_estimated_flops_grow_with_scale_steps_and_crops():
    micro = {"model": {"scale": "micro"}, "schedule": {"steps": 10, "batch_size": 8}}
    assert estimate_train_flops({**micro, "schedule": {"steps": 20, "batch_size": 8}}) == 2 * estimate_train_flops(micro)
    assert estimate_train_flops({**micro, "model": {"scale": "base"}}) > 500 * estimate_train_flops(micro)
    assert estimate_train_flops({**micro, "framework": "dinov2"}) > 3 * estimate_train_flops(micro)


@pytest.mark.parametrize("command", ["plan", "status"])
def test_plan_and_status_start_without_heavy_imports(command, cli_env):
    """Read-only commands answer fast: neither torch nor mlflow (nor, for a plain local sweep, the
    search, cluster or plotting libraries) is imported to show a plan or a status."""
    heavy = {"torch", "timm", "mlflow", "optuna", "ray", "submitit", "matplotlib"}
    probe = ("import runpy, sys\n"
             f"sys.argv = ['orchestrator', {command!r}, 'sweeps/component_ablation.yaml']\n"
             "try:\n    runpy.run_module('orchestrator', run_name='__main__')\n"
             "except SystemExit as end:\n    assert end.code == 0, end.code\n"
             f"print('HEAVY', sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(heavy)!r})))")
    done = subprocess.run([PYTHON, "-c", probe], cwd=REPO, capture_output=True, text=True, env=cli_env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1] == "HEAVY []", done.stdout[-2000:]


def cli(*args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-m", "orchestrator", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def running(root: Path, sweep: str, n: int):
    trials = read_ledger(root, sweep)["trials"].values()
    return [t for t in trials if t["state"] == "running"] if sum(t["state"] == "running" for t in trials) >= n else None


def test_ctrl_c_stops_trials_cleanly_and_the_next_run_resumes(tmp_path, project_root, stand_in, cli_env):
    stand_in.behave(case={"sleep": 60, "grandchild": True})
    path = spec_file(tmp_path, "stopme", ["ok", "nan", "oom"], backend={"max_parallel": 2})
    proc = cli("run", str(path), "--no-report", env=cli_env)
    try:
        live = wait_for(lambda: running(project_root, "stopme", 2), timeout=60, what="2 running trials")
        # A second orchestrator on the same sweep is refused, naming the first.
        second = subprocess.run([PYTHON, "-m", "orchestrator", "run", str(path)], cwd=REPO, env=cli_env,
                                capture_output=True, text=True)
        assert second.returncode == 3
        assert f"sweep stopme is already running (pid {proc.pid})" in second.stderr
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=30)[0]
    finally:
        proc.kill()
    assert proc.returncode == 130, output
    trials = read_ledger(project_root, "stopme")["trials"]
    for t in live:
        record = trials[t["trial_id"]]
        assert record["state"] == "cancelled" and record["job"] is None
        assert not pid_alive(t["job"]["info"]["pid"])
        run_dir = Path(t["run_dir"])
        assert (run_dir / "got_sigterm").exists()  # SIGTERM first: the trainer checkpoints and exits 75
        assert not pid_alive(int((run_dir / "grandchild.pid").read_text()))  # the whole process group
    assert [t["state"] for t in trials.values()].count("planned") == 1

    stand_in.behave(case={"sleep": 0})
    rerun = subprocess.run([PYTHON, "-m", "orchestrator", "run", str(path), "--no-report"], cwd=REPO, env=cli_env,
                           capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert {t["state"] for t in read_ledger(project_root, "stopme")["trials"].values()} == {"done"}


def test_sigkilled_orchestrator_is_replaced_and_reattaches_to_live_trials(tmp_path, project_root, stand_in, cli_env):
    release = tmp_path / "release"
    stand_in.behave(case={"sleep": 120, "until": str(release)})
    path = spec_file(tmp_path, "phoenix", ["ok", "nan", "oom"], backend={"max_parallel": 2})
    proc = cli("run", str(path), "--no-report", env=cli_env)
    live = wait_for(lambda: running(project_root, "phoenix", 2), timeout=90, what="2 running trials")
    proc.send_signal(signal.SIGKILL)  # no cleanup at all; the trainers keep running
    proc.wait()
    assert all(pid_alive(t["job"]["info"]["pid"]) for t in live)

    rerun = cli("run", str(path), "--no-report", env=cli_env)
    try:
        def reattached():
            trials = read_ledger(project_root, "phoenix")["trials"]
            return all((trials[t["trial_id"]]["note"] or "").startswith("reattached") for t in live)

        wait_for(reattached, timeout=90, what="the new orchestrator to reattach both trials")
        release.write_text("")
        output = rerun.communicate(timeout=90)[0]
    finally:
        rerun.kill()
    assert rerun.returncode == 0, output
    assert output.count("reattached") == 2
    assert starts_per_case(stand_in) == {"ok": 1, "nan": 1, "oom": 1}  # nothing ran twice
    trials = read_ledger(project_root, "phoenix")["trials"].values()
    assert {t["state"] for t in trials} == {"done"} and {t["attempts"] for t in trials} == {1}


def test_two_sweeps_sharing_a_trial_never_run_it_twice_at_once(tmp_path, project_root, stand_in, cli_env):
    release = tmp_path / "release"
    stand_in.behave(case={"sleep": 120, "until": str(release)})
    a = spec_file(tmp_path, "alpha", ["ok", "five"])
    b = spec_file(tmp_path, "beta", ["five", "oom"])
    procs = [cli("run", str(a), "--no-report", env=cli_env), cli("run", str(b), "--no-report", env=cli_env)]
    try:
        def one_runs_five_and_the_other_waits():
            five = [trials_by_case(project_root, s).get("five") for s in ("alpha", "beta")]
            if None in five:
                return False
            states = sorted((f["state"], (f["note"] or "").startswith("running elsewhere")) for f in five)
            return states == [("planned", True), ("running", False)]

        wait_for(one_runs_five_and_the_other_waits, timeout=120, what="one sweep to wait for the other's trial")
        release.write_text("")
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert starts_per_case(stand_in) == {"ok": 1, "five": 1, "oom": 1}
    five = [trials_by_case(project_root, s)["five"] for s in ("alpha", "beta")]
    assert {f["state"] for f in five} == {"done"} and sorted(f["reused"] for f in five) == [False, True]


def test_detach_then_status_and_cancel(tmp_path, project_root, stand_in, cli_env, capsys, monkeypatch):
    stand_in.behave(case={"sleep": 60})
    path = spec_file(tmp_path, "bg", ["ok", "nan"], backend={"max_parallel": 2})
    assert main(["run", str(path), "--detach", "--no-report"]) == 0
    out = capsys.readouterr().out
    assert "runs in the background" in out and "orchestrator.log" in out
    wait_for(lambda: running(project_root, "bg", 2), timeout=60, what="2 running trials")
    assert main(["status", str(path)]) == 0
    assert "running 2" in capsys.readouterr().out
    assert main(["cancel", str(path)]) == 0
    assert "stopped orchestrator pid" in capsys.readouterr().out
    assert {t["state"] for t in read_ledger(project_root, "bg")["trials"].values()} == {"cancelled"}


def test_help_explains_every_command():
    out = subprocess.run([PYTHON, "-m", "orchestrator", "--help"], cwd=REPO, capture_output=True, text=True,
                         env=orchestrator_env()).stdout
    for command in ("run", "plan", "status", "report", "cancel", "sync"):
        assert f"  {command} " in out
