"""The trainer as a process, for every backend: its command line and environment, who it is over
time (`ProcessIdentity`), stopping its process group, and its exit code as a job state.

The local backend runs it on this machine, the Ray actor on a worker, the Slurm job on a node;
all three build the command and the environment here, so a trainer is started the same way
everywhere. The Slurm job pickles this module by value (it must not need this checkout's
orchestrator at run time): keep the argv/env helpers free of other project imports.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.backends.base import JobHandle, JobState, state_from_result
from orchestrator.store import last_line
from trainer.contract import CONFIG_FILE, failure_from_exit

COMMAND_ENV = "ORCHESTRATOR_TRAINER_COMMAND"  # replaces `python -m trainer` (a wrapper, a profiler, a test double)
CPUS_ENV = "ORCHESTRATOR_CPUS_PER_TRIAL"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


# -- command and environment -------------------------------------------------------------------
def trainer_command(command: Sequence[str] | str | None) -> list[str] | None:
    """The spec's `options.command`, else `$ORCHESTRATOR_TRAINER_COMMAND`, as argv; None: `python -m
    trainer` of whichever python starts it (this one, a Ray worker's, a Slurm job's)."""
    command = command or os.environ.get(COMMAND_ENV)
    if isinstance(command, str):
        command = shlex.split(command)
    return list(command) if command else None


def trainer_argv(command: Sequence[str] | None, run_dir: Path | str) -> list[str]:
    run_dir = Path(run_dir)
    return [*(command or [sys.executable, "-m", "trainer"]), "--config", str(run_dir / CONFIG_FILE),
            "--out", str(run_dir)]


def trainer_env(threads: int, extra: Mapping[str, Any], base: Mapping[str, str],
                more: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (usually os.environ) plus `threads` for the math libraries (parallel trials must not
    oversubscribe cores), unbuffered output (the log shows progress as it happens), `more` (what
    the backend adds: PYTHONPATH of a snapshot, torch.distributed's variables) and the spec's
    `options.env`, which wins."""
    env = dict(base)
    env.update({name: str(threads) for name in THREAD_VARIABLES})
    env[CPUS_ENV] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(more or {})
    env.update({str(k): str(v) for k, v in extra.items()})
    return env


def log_header(log: Any, where: str, argv: Sequence[str]) -> None:
    """One line per attempt in DIR/trainer.log (opened for appending, binary)."""
    log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {where}: {shlex.join(argv)}\n".encode())
    log.flush()


# -- identity ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProcessIdentity:
    """A pid plus what makes it unique over time: its start time (clock ticks since boot) and the boot."""

    pid: int
    start_ticks: int | None
    boot_id: str | None

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity:
        return cls(pid, _start_ticks(pid), _boot_id())

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> ProcessIdentity | None:
        """From a pid file or a handle's info (None when it names no pid)."""
        if "pid" not in info:
            return None
        return cls(int(info["pid"]), info.get("start_ticks"), info.get("boot_id"))

    def info(self) -> dict[str, Any]:
        """What a pid file records about the process (the trainer runs in its own process group)."""
        return {"pid": self.pid, "pgid": self.pid, "start_ticks": self.start_ticks, "boot_id": self.boot_id}

    def is_alive(self) -> bool:
        """Still this very process, and not a zombie."""
        if self.boot_id and _boot_id() and self.boot_id != _boot_id():
            return False
        stat = _proc_stat(self.pid)
        if stat is None:
            if Path("/proc").is_dir():
                return False
            try:  # no procfs (macOS): the best available check
                os.kill(self.pid, 0)
                return True
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
        state, start_ticks = stat
        if state in ("Z", "X"):
            return False
        return self.start_ticks is None or start_ticks == self.start_ticks


def _proc_stat(pid: int) -> tuple[str, int] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after the last ')'.
    fields = raw[raw.rindex(")") + 2:].split()
    return fields[0], int(fields[19])  # state (field 3), starttime (field 22)


def _start_ticks(pid: int) -> int | None:
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


# -- stopping ----------------------------------------------------------------------------------
def signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def stop_groups(groups: Sequence[tuple[int, Callable[[], bool]]], grace_s: float) -> None:
    """SIGTERM every (process group, still running?) at once (the trainer checkpoints and exits 75),
    wait up to `grace_s` for them, then SIGKILL the groups (also reaps stragglers: data-loader workers)."""
    for pgid, _ in groups:
        signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(running() for _, running in groups):
        time.sleep(0.05)
    for pgid, _ in groups:
        signal_group(pgid, signal.SIGKILL)


# -- how it ended ------------------------------------------------------------------------------
def state_from_exit(handle: JobHandle, returncode: int | None) -> JobState:
    """A finished trainer's state: its result.json when it wrote one, else its exit code (None:
    nobody saw the exit) with the last line of its log."""
    result = handle.trial_dir.result()
    if result is not None:
        return state_from_result(result)  # the trainer's own verdict wins
    return JobState.failed(*failure_from_exit(returncode, last_line(handle.log_path)))
