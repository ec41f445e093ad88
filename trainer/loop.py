"""One trial, start to finish: build, train (resumably), evaluate, write `DIR/result.json`.

Resume is exact on CPU: the learning rate is a function of the step, each epoch's data order is a
seeded permutation, augmentations and masks are functions of (seed, epoch/step, index), and the
checkpoint holds the model, optimizer, teacher and RNG states. So a run killed with SIGKILL and
started again with the same DIR ends with the same final metrics as an uninterrupted run.
"""

from __future__ import annotations

import signal
import time
import traceback
from pathlib import Path
from typing import Any

import timm
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

import trainer.models as tm
from trainer.checkpoint import TrainState, apply_checkpoint, read_checkpoint, save_checkpoint
from trainer.config import TrialConfig
from trainer.config_evaluation import EvaluationConfig, validation_evaluation
from trainer.data import build_eval_datasets, build_train_dataset, num_classes, resolve_img_size
from trainer.contract import (
    ERROR, NAN, OOM, PROGRESS_FILE, RESOLVED_CONFIG_FILE, RUN_ARTIFACT_FILES,
    VALIDATION_PREFIX, TrialResult, append_jsonl, read_result, write_result, write_text_atomic,
)
from trainer.evaluation import evaluate
from trainer.objectives import build_meta_arch
from trainer.out_dir import claim_out_dir
from trainer.objectives.param_groups import GroupRules, build_optimizer
from trainer.objectives.schedules import (
    apply_optimizer_schedule, last_layer_learning_rate, learning_rate, weight_decay)
from trainer.runtime import Runtime, peak_memory_mb, setup_runtime, teardown_runtime
from trainer.tracking import Tracker



class NonFiniteLoss(RuntimeError):
    def __init__(self, value: float, step: int):
        super().__init__(f"loss became {value} at step {step}")
        self.step = step


class LossHealth:
    """Finiteness of the loss, tracked on the device: the first non-finite step and its value
    are recorded without a host sync, and `check()` (one sync) raises for the step it happened."""

    def __init__(self, device: torch.device):
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_value = torch.zeros((), dtype=torch.float32, device=device)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        newly_bad = ~torch.isfinite(loss.detach()) & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(newly_bad, step, self.first_bad_step)
        self.bad_value = torch.where(newly_bad, loss.detach().float(), self.bad_value)

    def check(self) -> None:
        step = int(self.first_bad_step)
        if step >= 0:
            raise NonFiniteLoss(float(self.bad_value), step)


class Interrupted(Exception):
    pass


# --- building ------------------------------------------------------------------------------------


def backbone_factory(cfg: TrialConfig):
    """A function that builds a fresh backbone (DINOv2 builds two: student and teacher)."""
    m = cfg.model
    kwargs: dict[str, Any] = dict(
        registers_follow=m.registers_follow,
        reg_tokens=m.reg_tokens,
        img_size=resolve_img_size(cfg),
        drop_path_rate=m.drop_path_rate,
        drop_path_uniform=m.drop_path_uniform,
        init_values=m.layer_scale_init,
        no_embed_class=m.no_embed_class,
        num_classes=0,
        # DINOv2's local crops are smaller than its global ones; its evaluation protocols feed 512 px
        # crops and whole NYU images to any model.
        dynamic_img_size=cfg.framework == "dinov2" or cfg.evaluation.protocol == "dinov2",
        **m.architecture(),
    )
    if m.patch_size:
        kwargs["patch_size"] = m.patch_size
    if m.match_params_of:
        kwargs["mlp_ratio"] = tm.match_vanilla_parameters(m.scale, m.match_params_of, **kwargs).mlp_ratio
    kwargs["specialization"] = m.specialization

    def build() -> nn.Module:
        model = timm.create_model(tm.MODEL_NAMES[m.scale], **kwargs)
        if m.pretrained:
            tm.load_vanilla_checkpoint(model, m.pretrained, resample=m.resample_pretrained)
        return model

    return build


def epoch_batches(num_samples: int, batch_size: int, seed: int, epoch: int, runtime: Runtime,
                  repeats: int = 1) -> list[list[tuple[int, int]]]:
    """This process's batches of one epoch as (index, copy) keys: a seeded permutation, strided
    across processes.

    With `world_size` processes, step s covers the same global samples as a single process with
    the full batch, so a distributed run sees exactly the data of a single-process run. With
    `repeats` > 1 (repeated augmentation, DeiT-III; `RASampler` in facebookresearch/deit's
    samplers.py) each sample of the permutation comes `repeats` times in a row, each copy with its
    own augmentation, cut to one epoch's length: the copies of an image go to neighbouring
    processes (or the same batch on one), and an epoch shows about num_samples / repeats images.
    """
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    keys = [(index, copy) for index in order for copy in range(repeats)][:num_samples]
    per_process = batch_size // runtime.world_size
    global_batches = num_samples // batch_size
    return [keys[b * batch_size + runtime.rank: (b + 1) * batch_size: runtime.world_size][:per_process]
            for b in range(global_batches)]


class RunBatches:
    """Every remaining batch of the run, from `start_step` on, across epochs, as `(epoch, index,
    copy)` keys (`TrainDataset` reads the epoch and copy from the key): one DataLoader, whose workers
    start once, serves the whole run, and a resumed run continues with the very batch it stopped before."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, runtime: Runtime, start_step: int, steps: int,
                 repeats: int = 1):
        self.num_samples, self.batch_size, self.seed, self.runtime = num_samples, batch_size, seed, runtime
        self.start_step, self.steps, self.repeats = start_step, steps, repeats
        self.per_epoch = num_samples // batch_size

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step)

    def __iter__(self):
        step = self.start_step
        while step < self.steps:
            epoch, offset = divmod(step, self.per_epoch)
            batches = epoch_batches(self.num_samples, self.batch_size, self.seed, epoch, self.runtime, self.repeats)
            for batch in batches[offset:]:
                if step >= self.steps:
                    return
                yield [(epoch, index, copy) for index, copy in batch]
                step += 1


# --- the trial -------------------------------------------------------------------------------------


class Trial:
    def __init__(self, cfg: TrialConfig, out_dir: Path, log=print) -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.log = log
        self._stop_signal: int | None = None

    def run(self) -> TrialResult | None:
        """Train + evaluate; returns the result written to DIR/result.json (None on other ranks)."""
        claim_out_dir(self.out_dir, self.cfg.to_dict())  # raises UnusableOutDir before any work
        done = read_result(self.out_dir)
        if done is not None and done.done:
            self.log(f"{self.out_dir} is finished already (result.json status done): nothing to do")
            return done
        runtime = setup_runtime(self.cfg.runtime)
        tracker = Tracker(self.cfg.tracking, self.out_dir, enabled=runtime.is_main)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
        state = TrainState()
        try:
            if runtime.is_main:
                write_text_atomic(self.out_dir / RESOLVED_CONFIG_FILE, yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
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
            steps = err.step if isinstance(err, NonFiniteLoss) else state.step
            result = TrialResult.failed(failure, _last_line(err), metrics=state.last_metrics, steps=steps,
                                        wall_time_s=state.wall_time_s, mlflow_run_id=tracker.run_id)
            self.log(f"trial failed ({failure}): {result.error}")
            if runtime.is_main:
                write_result(self.out_dir, result)
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

    def _train_and_evaluate(self, runtime: Runtime, tracker: Tracker, state: TrainState) -> TrialResult | None:
        cfg, sched, opt = self.cfg, self.cfg.schedule, self.cfg.optimizer
        if sched.batch_size % runtime.world_size:
            raise ValueError(f"schedule.batch_size {sched.batch_size} is not divisible by {runtime.world_size} processes")
        torch.manual_seed(cfg.seed)
        dataset = build_train_dataset(cfg)
        if len(dataset) < sched.batch_size:
            raise ValueError(f"the training set has {len(dataset)} samples, fewer than schedule.batch_size {sched.batch_size}")
        meta_arch = build_meta_arch(cfg, backbone_factory(cfg), num_classes(cfg), sched.steps).to(runtime.device)
        optimizer = build_optimizer(meta_arch.trainable_parameters_groups(GroupRules.of(opt)), opt, runtime.device)
        ckpt = read_checkpoint(self.out_dir, self.log)
        if ckpt is not None:  # restores the RNG stream too
            state.__dict__.update(apply_checkpoint(ckpt, meta_arch, optimizer).__dict__)
        else:
            torch.manual_seed(cfg.seed * 7919 + runtime.rank)  # dropout/drop-path stream per process

        model: nn.Module = meta_arch
        if runtime.distributed:
            model = nn.parallel.DistributedDataParallel(meta_arch, find_unused_parameters=cfg.framework == "dinov2")
        if runtime.compile:
            model = torch.compile(model, mode=runtime.compile_mode)
        cuda = runtime.device.type == "cuda"
        loader = DataLoader(dataset, collate_fn=dataset.collate,
                            batch_sampler=RunBatches(len(dataset), sched.batch_size, cfg.seed, runtime,
                                                     state.step, sched.steps, cfg.data.repeated_augmentation),
                            num_workers=cfg.data.num_workers, pin_memory=cuda,
                            worker_init_fn=_ignore_stop_signals if cfg.data.num_workers else None)
        # The device never waits for the host: losses stay on the device and are read (one sync)
        # only where the host needs them: log lines, evaluations, checkpoints and the end.
        health = LossHealth(runtime.device)
        losses: dict[str, torch.Tensor] = {}

        meta_arch.train()
        started = time.perf_counter()
        last_tick = started  # img/s counts data loading too: from the end of one step to the end of the next
        for batch in loader:
            lr = learning_rate(state.step, opt, sched)
            apply_optimizer_schedule(optimizer, lr, weight_decay(state.step, opt, sched),
                                     last_layer_learning_rate(state.step, lr, opt))
            batch = _to_device(batch, runtime.device)
            with runtime.autocast():
                losses = model(batch, state.step)
            health.observe(losses["loss"], state.step)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            if opt.grad_clip:
                for params in (meta_arch.grad_clip_groups() if opt.clip_per_module else [meta_arch.parameters()]):
                    nn.utils.clip_grad_norm_(params, opt.grad_clip)
            optimizer.step()
            meta_arch.after_step(state.step)
            state.step += 1

            now = time.perf_counter()
            elapsed, last_tick = now - last_tick, now
            n_images = _batch_images(batch) * runtime.world_size
            if state.step > 2:  # the first steps pay for allocation / compilation
                state.train_time_s += elapsed
                state.images_seen += n_images
            every = cfg.evaluation.every_steps
            evaluate_now = bool(every) and state.step % every == 0 and state.step < sched.steps
            stop = runtime.any_process(self._stop_signal is not None)
            checkpoint_now = state.step % sched.checkpoint_every == 0 or state.step == sched.steps or stop
            if state.step % sched.log_every == 0 or state.step == sched.steps or evaluate_now or checkpoint_now:
                health.check()  # never log, evaluate or checkpoint a diverged model
                state.last_metrics = {k: float(v.detach()) for k, v in losses.items()}
            if state.step % sched.log_every == 0 or state.step == sched.steps:
                self._log_progress(state, started, lr, tracker)
            # Before the checkpoint: a run killed in between evaluates this step again on resume
            # (a repeated line in progress.jsonl) rather than never.
            if evaluate_now:
                self._intermediate_evaluation(runtime, tracker, state, meta_arch)
            if checkpoint_now:
                state.wall_time_s += time.perf_counter() - started
                started = time.perf_counter()
                if runtime.is_main:
                    save_checkpoint(self.out_dir, meta_arch, optimizer, state)
                runtime.barrier()
            if stop:
                raise Interrupted()
        return self._finish(runtime, tracker, state, meta_arch)

    def _intermediate_evaluation(self, runtime: Runtime, tracker: Tracker, state: TrainState, meta_arch) -> None:
        """The cheap global probes on the validation split, appended to DIR/progress.jsonl: the
        learning curve a hyperparameter search prunes on. Dense probes wait for the end. Every
        process evaluates: feature extraction is split over them (trainer/evaluation/features.py)."""
        started = time.perf_counter()
        quick = validation_evaluation(self.cfg.evaluation, intermediate=True)
        metrics = evaluate(meta_arch.eval_backbone, build_eval_datasets(self._with(quick), "validation"), quick,
                           runtime.device, self.out_dir)
        if runtime.is_main:
            metrics = {VALIDATION_PREFIX + k: v for k, v in metrics.items()}
            append_jsonl(self.out_dir / PROGRESS_FILE, {"step": state.step, "metrics": metrics})
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

    def _with(self, evaluation: EvaluationConfig) -> TrialConfig:
        return self.cfg.model_copy(update={"evaluation": evaluation})

    def _finish(self, runtime: Runtime, tracker: Tracker, state: TrainState, meta_arch) -> TrialResult | None:
        result = None
        # Every process evaluates (extraction and dense heads are split over them), so no rank
        # waits in a barrier for the whole evaluation; rank 0 alone writes and logs.
        backbone = meta_arch.eval_backbone
        eval_start = time.perf_counter()
        metrics = evaluate(backbone, build_eval_datasets(self.cfg), self.cfg.evaluation, runtime.device, self.out_dir)
        if self.cfg.data.val_fraction:
            quick = validation_evaluation(self.cfg.evaluation)
            validation = evaluate(backbone, build_eval_datasets(self._with(quick), "validation"), quick,
                                  runtime.device, self.out_dir)
            metrics |= {VALIDATION_PREFIX + k: v for k, v in validation.items()}
        eval_time = time.perf_counter() - eval_start
        if runtime.is_main:
            params = tm.parameter_report(backbone)
            flops = tm.count_flops(backbone, resolve_img_size(self.cfg))
            throughput = state.images_seen / state.train_time_s if state.train_time_s else None
            result = TrialResult(
                status="done", metrics=metrics, train=state.last_metrics, params=params.as_dict(), flops=flops,
                throughput_img_s=throughput, wall_time_s=state.wall_time_s, eval_time_s=eval_time,
                peak_memory_mb=peak_memory_mb(runtime.device), steps=state.step, world_size=runtime.world_size,
                device=str(runtime.device), mlflow_run_id=tracker.run_id,
            )
            summary = params.as_dict() | {
                "flops": flops, "throughput_img_s": throughput or 0.0,
                "wall_time_s": state.wall_time_s, "peak_memory_mb": result.peak_memory_mb}
            tracker.log_metrics(metrics | summary, step=state.step)
            write_result(self.out_dir, result)
            for artifact in RUN_ARTIFACT_FILES:
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
        return NAN
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(err).lower():
        return OOM
    return ERROR


def _last_line(err: BaseException) -> str:
    lines = traceback.format_exception_only(type(err), err)
    return lines[-1].strip() if lines else repr(err)
