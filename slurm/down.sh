#!/usr/bin/env bash
# Stop the single-node Slurm cluster started by slurm/up.sh: cancel the jobs still queued or running
# on it, then stop slurmd, slurmctld, slurmdbd, MariaDB and munged -- only the processes up.sh started
# (recorded with their start times in $CLS_SLURM_STATE/run/*.owned). Safe to run twice. Configs,
# the accounting database and the job state stay, so the next up.sh is quick.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=slurm/lib.sh
source "$HERE/lib.sh"
require_root

if ! ls "$RUN_DIR"/*.owned > /dev/null 2>&1; then
    log "nothing to stop (no daemon started by slurm/up.sh is recorded in $RUN_DIR)"
    exit 0
fi

if owned_pid slurmctld > /dev/null && scontrol ping 2>/dev/null | grep -q "is UP"; then
    jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
    if [[ -n ${jobs// /} ]]; then
        log "cancelling jobs still on the cluster: $jobs"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
        for ((i = 0; i < 90; i++)); do
            [[ -z $(squeue -h -o %A 2>/dev/null) ]] && break
            sleep 0.5
        done
        [[ -z $(squeue -h -o %A 2>/dev/null) ]] || log "warning: jobs still listed after 45 s: $(squeue -h -o %A | tr '\n' ' ')"
    fi
fi

for name in slurmd slurmctld slurmdbd mariadb munge; do
    stop_daemon "$name"
done
log "cluster stopped"
