#!/usr/bin/env bash
# Which of the daemons started by slurm/up.sh are running, the node's state and the queue.
# Exit code 0 when the cluster is usable (controller up, node idle/mixed/allocated), else 1.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=slurm/lib.sh
source "$HERE/lib.sh"

for name in munge mariadb slurmdbd slurmctld slurmd; do
    if pid=$(owned_pid "$name"); then
        printf '%-10s running (pid %s)\n' "$name" "$pid"
    else
        printf '%-10s not started by up.sh\n' "$name"
    fi
done
state=$(sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -n 1)
printf 'node %s: %s\n' "$HOST" "${state:-unreachable}"
squeue 2>/dev/null || true
[[ $state =~ ^(idle|mixed|allocated|completing)$ ]]
