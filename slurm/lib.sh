# Shared by slurm/up.sh, slurm/down.sh and slurm/status.sh (sourced, not run).
#
# Settings (environment variables, all optional):
#   CLS_SLURM_STATE      state dir: database, spool, logs, pid files   (default /var/lib/cls-slurm)
#   CLS_SLURM_CONF_DIR   where slurm.conf/slurmdbd.conf go              (default /etc/slurm; elsewhere
#                        every Slurm command needs SLURM_CONF=$CLS_SLURM_CONF_DIR/slurm.conf)
#   CLS_SLURM_CLUSTER    cluster name (cls)        CLS_SLURM_PARTITION  partition (debug)
#   CLS_SLURM_ACCOUNT    account for root (cls)    CLS_SLURM_DB_PORT    MariaDB loopback port (53306)
#   CLS_SLURM_CTLD_PORT / CLS_SLURMD_PORT / CLS_SLURMDBD_PORT           (6817 / 6818 / 6819)
#   CLS_SLURM_TIMEOUT    seconds to wait for each daemon and for the node to be idle (120)

STATE=${CLS_SLURM_STATE:-/var/lib/cls-slurm}
CONF_DIR=${CLS_SLURM_CONF_DIR:-/etc/slurm}
CLUSTER=${CLS_SLURM_CLUSTER:-cls}
PARTITION=${CLS_SLURM_PARTITION:-debug}
ACCOUNT=${CLS_SLURM_ACCOUNT:-cls}
DB_PORT=${CLS_SLURM_DB_PORT:-53306}
CTLD_PORT=${CLS_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${CLS_SLURMD_PORT:-6818}
DBD_PORT=${CLS_SLURMDBD_PORT:-6819}
TIMEOUT=${CLS_SLURM_TIMEOUT:-120}
HOST=$(hostname -s)
MARKER="Managed by slurm/up.sh (cls-slurm)"

RUN_DIR=$STATE/run        # <name>.owned: "PID STARTTIME" of each daemon up.sh started
LOG_DIR=$STATE/log
DB_DIR=$STATE/mysql
DB_RUN=$STATE/mysql-run   # the MariaDB socket (owned by the mysql user)
DB_SOCKET=$DB_RUN/mysqld.sock

if [[ "$CONF_DIR" != /etc/slurm ]]; then
    export SLURM_CONF=$CONF_DIR/slurm.conf
fi

log() { printf '[cls-slurm] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

require_root() {
    [[ $EUID -eq 0 ]] || die "run as root (the daemons run as root, munge and mysql)"
}

# The kernel's start time of a process (clock ticks since boot): a pid plus this is unique.
start_ticks() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }               # the command name may hold spaces: cut after the last ')'
    # shellcheck disable=SC2086
    set -- $stat
    echo "${20}"                     # field 22 of the full line
}

# Print the pid of daemon NAME if up.sh started it and it is still that very process.
owned_pid() {
    local name=$1 file=$RUN_DIR/$1.owned pid ticks now
    [[ -f $file ]] || return 1
    read -r pid ticks < "$file" || return 1
    [[ -n $pid && -d /proc/$pid ]] || return 1
    now=$(start_ticks "$pid") || return 1
    [[ "$now" == "$ticks" ]] || return 1
    local state
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)
    [[ $state != Z ]] || return 1
    echo "$pid"
}

# start_daemon NAME CMD...: run CMD (a daemon kept in the foreground) in its own session, log to
# $LOG_DIR/NAME.out, and record it as ours. No-op when our NAME is already running.
start_daemon() {
    local name=$1; shift
    local pid
    if pid=$(owned_pid "$name"); then
        log "$name already running (pid $pid)"
        return 0
    fi
    mkdir -p "$RUN_DIR" "$LOG_DIR"
    setsid "$@" >> "$LOG_DIR/$name.out" 2>&1 < /dev/null &
    pid=$!
    sleep 0.2
    local ticks
    ticks=$(start_ticks "$pid") || { tail_logs "$name"; die "$name exited at once"; }
    echo "$pid $ticks" > "$RUN_DIR/$name.owned"
    log "started $name (pid $pid)"
}

# stop_daemon NAME: SIGTERM our NAME, wait up to 30 s, then SIGKILL. Never touches a process
# up.sh did not start (no .owned file, or the pid now belongs to another process).
stop_daemon() {
    local name=$1 pid
    if ! pid=$(owned_pid "$name"); then
        rm -f "$RUN_DIR/$name.owned"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    local i
    for ((i = 0; i < 300; i++)); do
        owned_pid "$name" > /dev/null || break
        sleep 0.1
    done
    if owned_pid "$name" > /dev/null; then
        log "$name (pid $pid) did not stop within 30 s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    rm -f "$RUN_DIR/$name.owned"
    log "stopped $name (pid $pid)"
}

tail_logs() {
    local name
    for name in "$@"; do
        local f
        for f in "$LOG_DIR/$name.log" "$LOG_DIR/$name.out"; do
            if [[ -s $f ]]; then
                echo "----- last lines of $f" >&2
                tail -n 25 "$f" >&2
            fi
        done
    done
}

# wait_for WHAT LOGS... -- CMD...: retry CMD every 0.5 s until it succeeds or $TIMEOUT passes.
wait_for() {
    local what=$1; shift
    local logs=()
    while [[ $1 != -- ]]; do logs+=("$1"); shift; done
    shift
    local deadline=$((SECONDS + TIMEOUT))
    until "$@" > /dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            tail_logs "${logs[@]}"
            die "timed out after ${TIMEOUT}s waiting for $what"
        fi
        sleep 0.5
    done
}
