"""One trial, start to finish: build, train (resumably), evaluate, write `DIR/result.json`.

Resume is exact on CPU: the learning rate is a function of the step, each epoch's data order is a
seeded permutation, augmentations and masks are functions of (seed, epoch/step, index), and the
checkpoint holds the model, optimizer, teacher and RNG states. So a run killed with SIGKILL and
started again with the same DIR ends with the same final metrics as an uninterrupted run.
"""

from __future__ import annotations

import math
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

import trainer.models as tm
from trainer.config import TrialConfig
from trainer.data import resolve_img_size
from trainer.io import append_jsonl, read_json, save_torch_atomic, write_json_atomic, write_text_atomic
from trainer.runtime import Runtime, peak_memory_mb, setup_runtime, teardown_runtime
from trainer.tracking import Tracker

CHECKPOINT = "checkpoint.pt"
RESULT = "result.json"
RESOLVED_CONFIG = "config.resolved.yaml"
PROGRESS = "progress.jsonl"  # one line per intermediate evaluation: {"step": s, "metrics": {...}}
VALIDATION_PREFIX = "val/"  # metrics measured on the validation hold-out (data.val_fraction)
EXIT_FAILED = 1
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped by a signal after a checkpoint; run again to resume


class NonFiniteLoss(RuntimeError):
    pass


class Interrupted(Exception):
    pass


@dataclass
class TrainState:
    step: int = 0
    wall_time_s: float = 0.0  # summed over resumes
    images_seen: int = 0
    train_time_s: float = 0.0  # time spent in steps after warm-up, for img/s
    last_metrics: dict[str, float] = field(default_factory=dict)


# --- building ------------------------------------------------------------------------------------


def backbone_factory(cfg: TrialConfig):
    """A function that builds a fresh backbone (DINOv2 builds two: student and teacher)."""
    m = cfg.model
    kwargs: dict[str, Any] = dict(
        specialization=m.specialization,
        registers_follow=m.registers_follow,
        reg_tokens=m.reg_tokens,
        img_size=resolve_img_size(cfg),
        drop_path_rate=m.drop_path_rate,
        init_values=m.layer_scale_init,
        num_classes=0,
        dynamic_img_size=cfg.framework == "dinov2",  # local crops are smaller than global ones
    )
    if m.patch_size:
        kwargs["patch_size"] = m.patch_size

    def build() -> nn.Module:
        model = timm.create_model(tm.MODEL_NAMES[m.scale], **kwargs)
        if m.pretrained:
            tm.load_vanilla_checkpoint(model, m.pretrained)
        return model

    return build


def epoch_batches(num_samples: int, batch_size: int, seed: int, epoch: int, runtime: Runtime) -> list[list[int]]:
    """This process's batches of one epoch: a seeded permutation, strided across processes.

    With `world_size` processes, step s covers the same global samples as a single process with
    the full batch, so a distributed run sees exactly the data of a single-process run.
    """
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    per_process = batch_size // runtime.world_size
    global_batches = num_samples // batch_size
    return [order[b * batch_size + runtime.rank: (b + 1) * batch_size: runtime.world_size][:per_process]
            for b in range(global_batches)]


# --- checkpoints -----------------------------------------------------------------------------------


def save_checkpoint(path: Path, meta_arch: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState) -> None:
    save_torch_atomic(path, {
        "model": meta_arch.state_dict(),
        "optimizer": optimizer.state_dict(),
        "state": state.__dict__,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    })


def load_checkpoint(path: Path, meta_arch: nn.Module, optimizer: torch.optim.Optimizer) -> TrainState:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    meta_arch.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng_cpu"])
    if ckpt.get("rng_cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng_cuda"])
    return TrainState(**ckpt["state"])


# --- the trial -------------------------------------------------------------------------------------


class Trial:
    def __init__(self, cfg: TrialConfig, out_dir: Path, log=print) -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.log = log
        self._stop_signal: int | None = None

    def run(self) -> dict[str, Any]:
        """Train + evaluate; returns the result written to DIR/result.json (main process)."""
        done = read_json(self.out_dir / RESULT)
        if done and done.get("status") == "done":
            self.log(f"{self.out_dir} is finished already (result.json status done): nothing to do")
            return done
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._check_same_trial()
        runtime = setup_runtime(self.cfg.runtime)
        tracker = Tracker(self.cfg.tracking, self.out_dir, enabled=runtime.is_main)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
        state = TrainState()
        try:
            if runtime.is_main:
                write_text_atomic(self.out_dir / RESOLVED_CONFIG, yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
            tracker.start(self.cfg.to_dict())
            result = self._train_and_evaluate(runtime, tracker, state)
            tracker.finish("FINISHED")
        except Interrupted:
            cause = f"signal {self._stop_signal}" if self._stop_signal else "a signal to another process"
            self.log(f"stopped by {cause} at step {state.step}; checkpoint saved, run again to resume")
            tracker.finish("KILLED")
            raise
        except BaseException as err:
            failure = classify_failure(err)
            result = {"status": "failed", "failure_class": failure, "error": _last_line(err),
                      "metrics": state.last_metrics, "step": state.step, "wall_time_s": state.wall_time_s,
                      "mlflow_run_id": tracker.run_id}
            self.log(f"trial failed ({failure}): {result['error']}")
            if runtime.is_main:
                write_json_atomic(self.out_dir / RESULT, result)
                tracker.set_tags({"status": "failed", "failure_class": failure})
                tracker.finish("FAILED")
            if isinstance(err, KeyboardInterrupt):
                raise
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            teardown_runtime(runtime)
        return result

    def _on_signal(self, signum, _frame) -> None:
        # Preemption (Slurm sends SIGUSR1/SIGTERM) or Ctrl-C from the orchestrator: stop at the next
        # step boundary with a checkpoint, so the trial resumes instead of restarting.
        self._stop_signal = signum

    def _check_same_trial(self) -> None:
        previous = self.out_dir / RESOLVED_CONFIG
        if not previous.exists():
            return
        old = yaml.safe_load(previous.read_text()) or {}
        new = self.cfg.to_dict()
        ignore = ("tracking", "name", "runtime")
        if {k: v for k, v in old.items() if k not in ignore} != {k: v for k, v in new.items() if k not in ignore}:
            raise SystemExit(f"{self.out_dir} holds a different trial (its {RESOLVED_CONFIG} differs); "
                             "use another --out folder or delete this one")

    def _train_and_evaluate(self, runtime: Runtime, tracker: Tracker, state: TrainState) -> dict[str, Any]:
        from trainer.data import build_train_dataset, collate_multicrop, num_classes
        from trainer.objectives import build_meta_arch
        from trainer.objectives.schedules import cosine_schedule

        cfg, sched, opt = self.cfg, self.cfg.schedule, self.cfg.optimizer
        if sched.batch_size % runtime.world_size:
            raise ValueError(f"schedule.batch_size {sched.batch_size} is not divisible by {runtime.world_size} processes")
        torch.manual_seed(cfg.seed)
        dataset = build_train_dataset(cfg)
        if len(dataset) < sched.batch_size:
            raise ValueError(f"the training set has {len(dataset)} samples, fewer than schedule.batch_size {sched.batch_size}")
        meta_arch = build_meta_arch(cfg, backbone_factory(cfg), num_classes(cfg), sched.steps).to(runtime.device)
        optimizer = torch.optim.AdamW(meta_arch.trainable_parameters_groups(opt.weight_decay), lr=opt.lr, betas=opt.betas)
        checkpoint = self.out_dir / CHECKPOINT
        if checkpoint.exists():  # restores the RNG stream too
            state.__dict__.update(load_checkpoint(checkpoint, meta_arch, optimizer).__dict__)
            self.log(f"resumed from {checkpoint} at step {state.step}")
        else:
            torch.manual_seed(cfg.seed * 7919 + runtime.rank)  # dropout/drop-path stream per process

        model: nn.Module = meta_arch
        if runtime.distributed:
            model = nn.parallel.DistributedDataParallel(meta_arch, find_unused_parameters=cfg.framework == "dinov2")
        if runtime.compile:
            model = torch.compile(model)
        collate = collate_multicrop if cfg.framework == "dinov2" else None
        batches_per_epoch = len(dataset) // sched.batch_size
        weight_decay = [g.get("weight_decay", 0.0) for g in optimizer.param_groups]

        meta_arch.train()
        started = time.perf_counter()
        last_tick = started  # img/s counts data loading too: from the end of one step to the end of the next
        while state.step < sched.steps:
            epoch, offset = divmod(state.step, batches_per_epoch)
            dataset.set_epoch(epoch)
            batches = epoch_batches(len(dataset), sched.batch_size, cfg.seed, epoch, runtime)[offset:]
            loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                                num_workers=cfg.data.num_workers, persistent_workers=False,
                                worker_init_fn=_ignore_stop_signals if cfg.data.num_workers else None)
            for batch in loader:
                lr = cosine_schedule(state.step, sched.steps, opt.lr, opt.min_lr, sched.warmup_steps)
                for group, wd in zip(optimizer.param_groups, weight_decay):
                    group["lr"], group["weight_decay"] = lr, wd
                batch = _to_device(batch, runtime.device)
                with runtime.autocast():
                    losses = model(batch, state.step)
                loss = losses["loss"]
                if not torch.isfinite(loss):
                    raise NonFiniteLoss(f"loss became {loss.item()} at step {state.step}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if opt.grad_clip:
                    nn.utils.clip_grad_norm_(meta_arch.parameters(), opt.grad_clip)
                optimizer.step()
                meta_arch.after_step(state.step)
                state.step += 1

                now = time.perf_counter()
                elapsed, last_tick = now - last_tick, now
                n_images = _batch_images(batch) * runtime.world_size
                if state.step > 2:  # the first steps pay for allocation / compilation
                    state.train_time_s += elapsed
                    state.images_seen += n_images
                state.last_metrics = {k: float(v.detach()) for k, v in losses.items()}
                if state.step % sched.log_every == 0 or state.step == sched.steps:
                    self._log_progress(state, started, lr, tracker)
                every = cfg.evaluation.every_steps
                # Before the checkpoint: a run killed in between evaluates this step again on resume
                # (a repeated line in progress.jsonl) rather than never.
                if every and state.step % every == 0 and state.step < sched.steps:
                    self._intermediate_evaluation(runtime, tracker, state, meta_arch)
                stop = runtime.any_process(self._stop_signal is not None)
                if state.step % sched.checkpoint_every == 0 or state.step == sched.steps or stop:
                    state.wall_time_s += time.perf_counter() - started
                    started = time.perf_counter()
                    if runtime.is_main:
                        save_checkpoint(checkpoint, meta_arch, optimizer, state)
                    runtime.barrier()
                if stop:
                    raise Interrupted()
                if state.step >= sched.steps:
                    break
        return self._finish(runtime, tracker, state, meta_arch)

    def _intermediate_evaluation(self, runtime: Runtime, tracker: Tracker, state: TrainState, meta_arch) -> None:
        """The cheap global probes on the validation split, appended to DIR/progress.jsonl: the
        learning curve a hyperparameter search prunes on. Dense probes wait for the end."""
        from trainer.data import build_eval_datasets
        from trainer.evaluation import evaluate

        if runtime.is_main:
            started = time.perf_counter()
            quick = self.cfg.evaluation.model_copy(update={"segmentation": False, "depth": False,
                                                           "token_interaction": False})
            metrics = evaluate(meta_arch.eval_backbone, build_eval_datasets(self.cfg, "validation"), quick,
                               runtime.device, self.out_dir)
            metrics = {VALIDATION_PREFIX + k: v for k, v in metrics.items()}
            append_jsonl(self.out_dir / PROGRESS, {"step": state.step, "metrics": metrics})
            tracker.log_metrics(metrics, step=state.step)
            self.log(f"step {state.step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
                     + f" ({time.perf_counter() - started:.1f} s)")
        runtime.barrier()

    def _log_progress(self, state: TrainState, started: float, lr: float, tracker: Tracker) -> None:
        total = self.cfg.schedule.steps
        img_s = state.images_seen / state.train_time_s if state.train_time_s else float("nan")
        wall = state.wall_time_s + time.perf_counter() - started
        eta = (total - state.step) * (state.train_time_s / max(1, state.step - 2)) if state.step > 2 else float("nan")
        loss = state.last_metrics.get("loss", float("nan"))
        self.log(f"step {state.step}/{total} loss {loss:.4f} lr {lr:.2e} {img_s:.1f} img/s "
                 f"elapsed {wall:.0f}s eta {eta:.0f}s")
        tracker.log_metrics({f"train/{k}": v for k, v in state.last_metrics.items()} | {"train/lr": lr,
                            "train/img_per_s": img_s}, step=state.step)

    def _finish(self, runtime: Runtime, tracker: Tracker, state: TrainState, meta_arch) -> dict[str, Any]:
        from trainer.data import build_eval_datasets
        from trainer.evaluation import evaluate

        result: dict[str, Any] = {}
        if runtime.is_main:
            backbone = meta_arch.eval_backbone
            eval_start = time.perf_counter()
            metrics = evaluate(backbone, build_eval_datasets(self.cfg), self.cfg.evaluation, runtime.device, self.out_dir)
            if self.cfg.data.val_fraction:
                no_plot = self.cfg.evaluation.model_copy(update={"token_interaction": False})
                validation = evaluate(backbone, build_eval_datasets(self.cfg, "validation"), no_plot,
                                      runtime.device, self.out_dir)
                metrics |= {VALIDATION_PREFIX + k: v for k, v in validation.items()}
            eval_time = time.perf_counter() - eval_start
            params = tm.parameter_report(backbone)
            flops = tm.count_flops(backbone, resolve_img_size(self.cfg))
            result = {
                "status": "done",
                "failure_class": None,
                "error": None,
                "metrics": metrics,
                "train": state.last_metrics,
                "params": params.as_dict(),
                "flops": flops,
                "throughput_img_s": state.images_seen / state.train_time_s if state.train_time_s else None,
                "wall_time_s": state.wall_time_s,
                "eval_time_s": eval_time,
                "peak_memory_mb": peak_memory_mb(runtime.device),
                "steps": state.step,
                "world_size": runtime.world_size,
                "device": str(runtime.device),
                "mlflow_run_id": tracker.run_id,
            }
            summary = {k: v for k, v in params.as_dict().items()} | {
                "flops": flops, "throughput_img_s": result["throughput_img_s"] or 0.0,
                "wall_time_s": state.wall_time_s, "peak_memory_mb": result["peak_memory_mb"]}
            tracker.log_metrics(metrics | summary, step=state.step)
            write_json_atomic(self.out_dir / RESULT, result)
            for artifact in (RESOLVED_CONFIG, RESULT, "token_interaction.png"):
                tracker.log_artifact(self.out_dir / artifact)
            self.log("final metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if "/block" not in k))
        runtime.barrier()
        return result


def _ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM/SIGUSR1: Slurm (and `timeout`, `kill -- -PGID`) signal
    every process of the job, and torch's worker handler would die on it, failing the trial with
    'DataLoader worker ... killed by signal' instead of the main process checkpointing at the next
    step. Workers still exit when the loader shuts them down (or when the main process is gone)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _batch_images(batch: Any) -> int:
    if isinstance(batch, dict):
        return int(batch["batch_size"])
    return int(batch[0].shape[0])


def classify_failure(err: BaseException) -> str:
    if isinstance(err, NonFiniteLoss):
        return "nan"
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(err).lower():
        return "oom"
    return "error"


def _last_line(err: BaseException) -> str:
    lines = traceback.format_exception_only(type(err), err)
    return lines[-1].strip() if lines else repr(err)
