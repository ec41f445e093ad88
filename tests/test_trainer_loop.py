"""`python -m trainer`: one trial end to end, exact resume, failures, tracking, distributed."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from trainer.cli import main as trainer_main
from trainer.config import TrialConfig, parse_config
from trainer.contract import CHECKPOINT_FILE, RESULT_FILE
from trainer.loop import Trial, classify_failure

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "data": {"scenes": {"train_size": 256, "val_size": 64}},
    "schedule": {"steps": 12, "batch_size": 32, "warmup_steps": 2, "checkpoint_every": 4, "log_every": 4},
    "evaluation": {"probe_epochs": 5, "max_train_samples": 128, "max_val_samples": 64},
    "runtime": {"threads": 1},
}


def tiny_config(tmp_path: Path, **sections) -> dict:
    data = json.loads(json.dumps(TINY))
    data["tracking"] = {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "tests"}
    for key, value in sections.items():
        data.setdefault(key, {})
        if isinstance(value, dict):
            data[key].update(value)
        else:
            data[key] = value
    return data


def write_config(tmp_path: Path, data: dict, name: str = "trial.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def run_trainer(config: Path, out: Path, *extra: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", "--config", str(config), "--out", str(out), *extra],
                          cwd=ROOT, capture_output=True, text=True, env=env, **kwargs)


def run_main(config: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """`python -m trainer` in this process (its refusals come before any training, and a new
    interpreter costs seconds of imports): exit code, stdout and stderr as a subprocess gives them."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = trainer_main(["--config", str(config), "--out", str(out), *extra])
    return subprocess.CompletedProcess([], code, stdout.getvalue(), stderr.getvalue())


def test_bad_config_fails_before_any_work(tmp_path):
    config = write_config(tmp_path, {"model": {"scael": "micro", "specialization": "paper,qvk"}, "framework": "ssl"})
    proc = run_trainer(config, tmp_path / "out")  # the real process: its exit code is the contract
    assert proc.returncode == 2
    assert "model.scael: unknown key; allowed here:" in proc.stderr
    assert "unknown component or preset 'qvk'" in proc.stderr
    assert "framework" in proc.stderr and "'supervised' or 'dinov2'" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_supervised_trial_end_to_end_with_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = parse_config(tiny_config(tmp_path, model={"specialization": "paper"},
                                   tracking={"run_name": "unit", "tags": {"trial_id": "abc"}}))
    logs: list[str] = []
    result = Trial(cfg, tmp_path / "out", log=logs.append).run()
    assert result.status == "done", result
    on_disk = json.loads((tmp_path / "out" / RESULT_FILE).read_text())
    assert on_disk["metrics"] == result.metrics
    for key in ("linear_top1_cls", "knn_top1", "seg_miou", "depth_rmse", "tokens/early_cls_patch_cos_post"):
        assert key in result.metrics, key
    assert result.params["params_added"] > 0 and result.flops > 0 and result.throughput_img_s > 0
    assert (tmp_path / "out" / "config.resolved.yaml").exists()
    assert any("img/s" in line and "eta" in line for line in logs)

    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["trial_id"] == "abc"
    assert run.data.params["model.specialization"] == cfg.model.specialization
    assert run.data.metrics["seg_miou"] == pytest.approx(result.metrics["seg_miou"])
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 3  # steps 4, 8, 12
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.resolved.yaml", "result.json", "token_interaction.png"} <= artifacts

    # A finished folder is not trained again, and keeps its single MLflow run.
    before = (tmp_path / "out" / RESULT_FILE).stat().st_mtime_ns
    again = Trial(cfg, tmp_path / "out", log=logs.append).run()
    assert again.to_dict() == on_disk and (tmp_path / "out" / RESULT_FILE).stat().st_mtime_ns == before
    assert len(client.search_runs([run.info.experiment_id])) == 1


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["none", "deit3"])  # deit3: repeated augmentation, Mixup / CutMix, LAMB
def test_sigkill_and_restart_ends_with_the_same_metrics(tmp_path, recipe):
    data = tiny_config(tmp_path, schedule={"steps": 16, "checkpoint_every": 4}, recipe=recipe)
    data["tracking"]["enabled"] = False
    config = write_config(tmp_path, data)
    reference = run_trainer(config, tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "--config", str(config), "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / CHECKPOINT_FILE).exists():
        time.sleep(0.05)
    step = torch.load(out / CHECKPOINT_FILE, weights_only=False)["state"]["step"]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert step < 16 and not (out / RESULT_FILE).exists()

    resumed = run_trainer(config, out)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out / CHECKPOINT_FILE} at step" in resumed.stdout
    a = json.loads((tmp_path / "reference" / RESULT_FILE).read_text())
    b = json.loads((out / RESULT_FILE).read_text())
    assert a["metrics"] == b["metrics"]
    wa = torch.load(tmp_path / "reference" / CHECKPOINT_FILE, weights_only=False)["model"]
    wb = torch.load(out / CHECKPOINT_FILE, weights_only=False)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigterm_checkpoints_and_exits_resumable(tmp_path):
    data = tiny_config(tmp_path, schedule={"steps": 400, "checkpoint_every": 200})
    data["tracking"]["enabled"] = False
    config = write_config(tmp_path, data)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "--config", str(config), "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # wait until training runs
        if "step 4/400" in line:
            break
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, output
    state = torch.load(out / CHECKPOINT_FILE, weights_only=False)["state"]
    assert 4 <= state["step"] < 200  # saved at the signal, not at a scheduled checkpoint
    assert not (out / RESULT_FILE).exists()


def test_sigterm_to_the_process_group_with_loader_workers_checkpoints(tmp_path):
    """Slurm, `timeout` and `kill -- -PGID` signal the DataLoader workers too: they must not die
    and turn a preemption into a failed trial ('DataLoader worker ... killed by signal')."""
    data = tiny_config(tmp_path, schedule={"steps": 400, "checkpoint_every": 200}, data={"num_workers": 2})
    data["tracking"]["enabled"] = False
    config = write_config(tmp_path, data)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "--config", str(config), "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    for line in proc.stdout:  # wait until training runs (workers started)
        if "step 4/400" in line:
            break
    os.killpg(proc.pid, signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, output
    assert "killed by signal" not in output
    assert 4 <= torch.load(out / CHECKPOINT_FILE, weights_only=False)["state"]["step"] < 200
    assert not (out / RESULT_FILE).exists()


def test_nan_loss_fails_at_once_with_class_nan(tmp_path):
    cfg = parse_config(tiny_config(tmp_path, optimizer={"lr": 1e30, "grad_clip": None},
                                   schedule={"steps": 50, "warmup_steps": 0}))
    result = Trial(cfg, tmp_path / "out", log=lambda m: None).run()
    assert result.status == "failed" and result.failure_class == "nan"
    assert result.steps < 50 and "loss became" in result.error
    assert json.loads((tmp_path / "out" / RESULT_FILE).read_text())["failure_class"] == "nan"


def test_errors_are_classified_with_the_last_traceback_line(tmp_path):
    # A checkpoint that exists (checked up front) but is garbage fails only when it is loaded.
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a pickle")
    config = write_config(tmp_path, tiny_config(tmp_path, model={"pretrained": str(garbage)}))
    proc = run_trainer(config, tmp_path / "out")
    assert proc.returncode == 1
    result = json.loads((tmp_path / "out" / RESULT_FILE).read_text())
    assert result["status"] == "failed" and result["failure_class"] == "error"
    assert result["error"].startswith("_pickle.UnpicklingError"), result["error"]


def test_out_of_memory_is_classified_oom():
    # A real OOM can't be caused safely on a shared CPU machine; the classifier is what matters.
    assert classify_failure(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")) == "oom"
    assert classify_failure(MemoryError()) == "oom"
    assert classify_failure(ValueError("x")) == "error"


def test_dinov2_trial_runs_with_multicrop_and_teacher(tmp_path):
    cfg = parse_config(tiny_config(tmp_path, framework="dinov2", model={"specialization": "paper"},
                                   dinov2={"out_dim": 128, "head_hidden_dim": 64, "head_bottleneck_dim": 32,
                                           "local_crops": 2},
                                   evaluation={"segmentation": False, "depth": False}))
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"enabled": False})})
    result = Trial(cfg, tmp_path / "out", log=lambda m: None).run()
    assert result.status == "done", result
    assert {"loss_dino", "loss_ibot", "loss_koleo"} <= set(result.train)
    assert "knn_top1" in result.metrics


def test_resuming_continues_the_same_mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    data = tiny_config(tmp_path, schedule={"steps": 40, "checkpoint_every": 100, "log_every": 2})
    config = write_config(tmp_path, data)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "--config", str(config), "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "step 4/40" in line:
            break
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 75
    run_id = (out / "mlflow_run_id").read_text()
    client = MlflowClient(tracking_uri=data["tracking"]["tracking_uri"])
    assert client.get_run(run_id).info.status == "KILLED"

    finish = run_trainer(config, out)
    assert finish.returncode == 0, finish.stderr
    assert json.loads((out / RESULT_FILE).read_text())["mlflow_run_id"] == run_id
    experiment = client.get_experiment_by_name("tests")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id] and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert steps[0] <= 4 and steps[-1] == 40  # both segments logged into the one run


def test_a_folder_refuses_a_different_trial(tmp_path):
    data = tiny_config(tmp_path)
    data["tracking"]["enabled"] = False
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.resolved.yaml").write_text(yaml.safe_dump(TrialConfig.model_validate(data).to_dict()))
    proc = run_main(write_config(tmp_path, data), out, "--set", "model.specialization=paper")
    assert proc.returncode == 2 and "holds a different trial" in proc.stderr



def test_a_folder_holding_a_different_finished_trial_is_refused_not_returned(tmp_path):
    data = tiny_config(tmp_path)
    data["tracking"]["enabled"] = False
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.resolved.yaml").write_text(yaml.safe_dump(TrialConfig.model_validate(data).to_dict()))
    (out / RESULT_FILE).write_text(json.dumps({"status": "done", "metrics": {"seg_miou": 0.5}}))
    proc = run_main(write_config(tmp_path, data), out, "--set", "model.specialization=paper")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "holds a different trial (differs in: model)" in lines[0] and str(out) in lines[0]
    assert "nothing to do" not in proc.stdout
    # The same trial, finished, is still answered from the folder without training.
    same = run_main(write_config(tmp_path, data), out)
    assert same.returncode == 0 and "finished already" in same.stdout


@pytest.mark.parametrize("where", ["a_file", "under_a_file"])
def test_an_out_path_that_cannot_be_a_folder_is_one_line_and_exit_2(tmp_path, where):
    data = tiny_config(tmp_path)
    data["tracking"]["enabled"] = False
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    out = blocker if where == "a_file" else blocker / "out"
    proc = run_main(write_config(tmp_path, data), out)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: --out {out}: ")
    assert blocker.read_text() == "a file, not a folder"


# Permissions do not bind root (CI runs as root): drop the capabilities that bypass them.
NO_DAC_OVERRIDE = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                   "--inh-caps=-dac_override,-dac_read_search"]


def test_a_read_only_out_folder_is_one_line_and_exit_2(tmp_path):
    data = tiny_config(tmp_path)
    data["tracking"]["enabled"] = False
    out = tmp_path / "read_only"
    out.mkdir()
    out.chmod(0o555)
    command = [sys.executable, "-m", "trainer", "--config", str(write_config(tmp_path, data)), "--out", str(out)]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without util-linux's setpriv: a read-only folder cannot be made binding")
        command = NO_DAC_OVERRIDE + command
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: --out {out}: cannot write there (Permission denied)"), lines[0]
    assert list(out.iterdir()) == []


@pytest.mark.slow
def test_two_process_gloo_matches_single_process(tmp_path):
    data = tiny_config(tmp_path, schedule={"steps": 3, "checkpoint_every": 3, "warmup_steps": 1},
                       evaluation={"linear": False, "knn": False, "segmentation": False, "depth": False,
                                   "token_interaction": False})
    data["tracking"]["enabled"] = False
    config = write_config(tmp_path, data)
    single = run_trainer(config, tmp_path / "single")
    assert single.returncode == 0, single.stderr
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "trainer", "--config", str(config), "--out", str(tmp_path / "ddp")],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    result = json.loads((tmp_path / "ddp" / RESULT_FILE).read_text())
    assert result["world_size"] == 2
    a = torch.load(tmp_path / "single" / CHECKPOINT_FILE, weights_only=False)["model"]
    b = torch.load(tmp_path / "ddp" / CHECKPOINT_FILE, weights_only=False)["model"]
    # Same global samples per step, gradients averaged across the two halves: same weights.
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-5, rtol=1e-4, msg=key)


@pytest.mark.slow
def test_a_signal_to_one_process_stops_every_process_at_the_same_step(tmp_path):
    """Preemption may reach ranks at different steps: they agree to stop, nobody hangs."""
    data = tiny_config(tmp_path, schedule={"steps": 400, "checkpoint_every": 200, "log_every": 2})
    data["tracking"]["enabled"] = False
    config = write_config(tmp_path, data)
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "trainer", "--config", str(config), "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:
        if "step 4/400" in line:
            break
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[1]), signal.SIGTERM)  # rank 1 only
    output = proc.communicate(timeout=180)[0]
    state = torch.load(out / CHECKPOINT_FILE, weights_only=False)["state"]
    assert 4 <= state["step"] < 200, output[-2000:]
    stops = re.findall(r"stopped by (signal 15|a signal to another process) at step (\d+)", output)
    assert sorted(cause for cause, _ in stops) == ["a signal to another process", "signal 15"], output[-2000:]
    assert {int(step) for _, step in stops} == {state["step"]}


def test_loss_health_reports_the_first_non_finite_step_at_the_next_check():
    from trainer.loop import LossHealth, NonFiniteLoss

    health = LossHealth(torch.device("cpu"))
    for step, value in enumerate([1.0, 0.5, float("inf"), float("nan"), 0.2]):
        health.observe(torch.tensor(value), step)
    with pytest.raises(NonFiniteLoss, match="loss became inf at step 2") as caught:
        health.check()
    assert caught.value.step == 2
    healthy = LossHealth(torch.device("cpu"))
    healthy.observe(torch.tensor(0.3), 0)
    healthy.check()  # finite: nothing raised


@pytest.mark.parametrize("damage", ["truncate_latest", "garbage_both"])
def test_a_corrupt_checkpoint_falls_back_or_restarts_and_never_fails_the_trial(tmp_path, damage):
    from trainer.contract import PREVIOUS_CHECKPOINT_FILE, read_result

    data = tiny_config(tmp_path, schedule={"steps": 12, "checkpoint_every": 4},
                       evaluation={"segmentation": False, "depth": False, "token_interaction": False})
    data["tracking"]["enabled"] = False
    reference = Trial(parse_config(data), tmp_path / "reference", log=lambda m: None).run()

    out = tmp_path / "out"
    # A finished run leaves checkpoints at steps 12 (latest) and 8 (previous); without its
    # result.json the next start resumes, as a run stopped after its last checkpoint would.
    Trial(parse_config(data), out, log=lambda m: None).run()
    (out / RESULT_FILE).unlink()
    latest, previous = out / CHECKPOINT_FILE, out / PREVIOUS_CHECKPOINT_FILE
    assert latest.exists() and previous.exists()
    if damage == "truncate_latest":
        latest.write_bytes(latest.read_bytes()[:1000])
    else:
        latest.write_bytes(b"\x00garbage")
        previous.write_text("not a checkpoint")
    logs: list[str] = []
    result = Trial(parse_config(data), out, log=logs.append).run()
    text = "\n".join(logs)
    assert result.done and read_result(out).done
    assert f"checkpoint {latest} is unreadable" in text and (out / f"{CHECKPOINT_FILE}.corrupt").exists()
    if damage == "truncate_latest":
        assert f"resumed from {previous} at step 8" in text
    else:
        assert "training starts over from step 0" in text
    # Resume is exact from any step, so the metrics are the uninterrupted run's.
    assert result.metrics == reference.metrics


@pytest.mark.parametrize("framework", ["supervised", "dinov2"])
def test_the_dinov2_protocol_gets_a_backbone_that_takes_any_image_size(framework):
    """Its segmentation crops are 512 px and its depth images 480 x 640, whatever the trial trains at."""
    from trainer.loop import backbone_factory

    config = {"framework": framework, "model": {"scale": "micro"}}
    backbone = backbone_factory(TrialConfig.model_validate({**config, "evaluation": {"protocol": "dinov2"}}))()
    grid = backbone.forward_intermediates(torch.zeros(1, 3, 48, 64), indices=[0], intermediates_only=True)[0]
    assert grid.shape[-2:] == (12, 16)  # micro: patch 4
    if framework == "supervised":  # the quick protocol keeps the model trained at one size
        fixed = backbone_factory(TrialConfig.model_validate(config))()
        with pytest.raises(AssertionError):
            fixed.forward_intermediates(torch.zeros(1, 3, 48, 64), indices=[0], intermediates_only=True)
