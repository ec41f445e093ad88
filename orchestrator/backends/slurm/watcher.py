"""What Slurm says about a sweep's jobs: `sacct`/`squeue` calls, their parsing, and their pacing.

One `sacct` for all of a sweep's jobs per query, queried again after `poll_min_s` and, while
nothing changes, after exponentially longer gaps up to `poll_max_s` (profile settings); a change
or a new submission resets the gap. Jobs the accounting database does not list yet are looked up
with `squeue`.
"""

from __future__ import annotations

import re
import subprocess
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

# Slurm job states (sacct/squeue), grouped by what the orchestrator does with them.
QUEUED_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD", "SUSPENDED",
                           "RESIZING", "PREEMPTED"})
RUNNING_STATES = frozenset({"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING", "STOPPED"})
ACTIVE_STATES = QUEUED_STATES | RUNNING_STATES


def run(argv: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
    """A Slurm command (sbatch, sacct, squeue, scancel); never raises on a non-zero exit."""
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)


def parse_job_ids(job_id: str) -> list[str]:
    """`12`, `12_3`, `12_[4-6,9%2]` -> the ids of single jobs / array tasks it stands for."""
    match = re.fullmatch(r"(\d+)_\[([0-9,\-]+)(?:%\d+)?\]", job_id)
    if match:
        base, ranges = match.groups()
        out = []
        for part in ranges.split(","):
            low, _, high = part.partition("-")
            out.extend(f"{base}_{i}" for i in range(int(low), int(high or low) + 1))
        return out
    return [job_id]


def base_id(job_id: str) -> str:
    """The array's job id of an array task (`12_3` -> `12`); a plain job's own id."""
    return job_id.split("_", 1)[0]


@dataclass(frozen=True)
class SlurmRecord:
    job_id: str
    state: str  # first word: "CANCELLED by 0" -> CANCELLED
    exit_code: int = 0
    exit_signal: int = 0
    reason: str = ""


def parse_sacct(text: str) -> dict[str, SlurmRecord]:
    """`sacct -X -n -P --format JobID,State,ExitCode` output -> {job id: record}."""
    out: dict[str, SlurmRecord] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 2 or not parts[0] or "." in parts[0]:
            continue
        state = parts[1].split()[0] if parts[1].split() else "UNKNOWN"
        rc, sig = 0, 0
        if len(parts) > 2 and ":" in parts[2]:
            a, _, b = parts[2].partition(":")
            rc, sig = int(a or 0), int(b or 0)
        reason = parts[1][len(state):].strip()
        for job_id in parse_job_ids(parts[0]):
            out[job_id] = SlurmRecord(job_id, state.rstrip("+"), rc, sig, reason)
    return out


class SlurmWatcher:
    """The last known record of every job asked about, refreshed with back-off."""

    def __init__(self, poll_min_s: float, poll_max_s: float) -> None:
        self.poll_min_s = poll_min_s
        self.poll_max_s = max(poll_min_s, poll_max_s)
        self.records: dict[str, SlurmRecord] = {}
        self._interval = poll_min_s
        self._next_query = 0.0
        self._squeue_cache: tuple[float, dict[str, tuple[str, str]]] | None = None

    def due(self) -> bool:
        return time.monotonic() >= self._next_query

    def soon(self) -> None:
        """Something changed (a submission): look again at the next poll."""
        self._interval = self.poll_min_s
        self._next_query = 0.0

    def refresh(self, job_ids: Sequence[str]) -> None:
        """One sacct call for every job (arrays by their base id), then schedule the next one."""
        before = {j: self.records.get(j) for j in job_ids}
        bases = sorted({base_id(j) for j in job_ids}, key=lambda b: int(b) if b.isdigit() else 0)
        try:
            proc = run(["sacct", "-X", "-n", "-P", "--format", "JobID,State,ExitCode", "-j", ",".join(bases)])
        except (OSError, subprocess.TimeoutExpired) as err:
            proc = subprocess.CompletedProcess([], 1, "", str(err))
        if proc.returncode == 0:
            self.records.update({k: v for k, v in parse_sacct(proc.stdout).items() if k in before or
                                 base_id(k) in bases})
        else:
            warnings.warn(f"sacct failed ({proc.stderr.strip()}); keeping the last known job states", stacklevel=3)
        missing = [j for j in job_ids if j not in self.records]
        if missing:  # not in the accounting database yet: ask the controller
            for job_id, (state, _) in self.squeue(missing, fresh=True).items():
                self.records[job_id] = SlurmRecord(job_id, state)
        changed = any(self.records.get(j) != before[j] for j in job_ids)
        self._interval = self.poll_min_s if changed else min(self.poll_max_s, self._interval * 2)
        self._next_query = time.monotonic() + self._interval

    def squeue(self, job_ids: Sequence[str] | None = None, fresh: bool = False) -> dict[str, tuple[str, str]]:
        """{job id: (state, job name)} of live jobs: the given ones, or all of this user's (cached 5 s)."""
        if job_ids is None and not fresh and self._squeue_cache and time.monotonic() - self._squeue_cache[0] < 5:
            return self._squeue_cache[1]
        argv = ["squeue", "-h", "-r", "-o", "%i|%T|%j"]
        argv += ["-j", ",".join(sorted({base_id(j) for j in job_ids}))] if job_ids else ["--me"]
        try:
            proc = run(argv)
        except (OSError, subprocess.TimeoutExpired):
            return {}
        out: dict[str, tuple[str, str]] = {}
        for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
            parts = line.strip().split("|")
            if len(parts) >= 3:
                for job_id in parse_job_ids(parts[0]):
                    out[job_id] = (parts[1].split()[0], parts[2])
        if job_ids is None:
            self._squeue_cache = (time.monotonic(), out)
        return out

    def is_live(self, job_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """The given jobs Slurm still has queued or running, as the controller says right now."""
        live = self.squeue(job_ids, fresh=True)
        return {j: v for j, v in live.items() if v[0] in ACTIVE_STATES}
