#!/usr/bin/env bash
# Bring up a single-node Slurm cluster on this machine (Debian 12: slurm 22.05), with accounting
# (slurmdbd on a private MariaDB) so `sacct` works, and wait until `sinfo` shows the node idle.
#
#   sudo slurm/up.sh          # idempotent: a second run finds everything up and does nothing
#   sudo slurm/down.sh        # stops exactly the daemons this script started (pid files)
#
# What it does, in order: install the Debian packages if missing (apt-get); write slurm.conf and
# slurmdbd.conf from slurm/templates/ (node name, CPUs and memory from this machine); start munged
# (unless a working one is already running), MariaDB (own datadir and loopback port under the
# state dir), slurmdbd; register the cluster, an account and root in the accounting database;
# start slurmctld and slurmd; wait for the node to be idle. Settings: see slurm/lib.sh.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=slurm/lib.sh
source "$HERE/lib.sh"
require_root

PACKAGES=(munge slurm-client slurmctld slurmd slurmdbd mariadb-server)

install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    log "installing ${missing[*]} (apt-get)"
    # Without systemd the packages' services cannot start anyway; a policy-rc.d keeps the
    # maintainer scripts from trying (ours only if none exists).
    local policy_added=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        policy_added=1
    fi
    local rc=0
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}"; } > "$STATE/apt.log" 2>&1 || rc=$?
    ((policy_added)) && rm -f /usr/sbin/policy-rc.d
    if ((rc != 0)); then
        tail -n 30 "$STATE/apt.log" >&2
        die "apt-get install ${missing[*]} failed (log: $STATE/apt.log)"
    fi
}

# -- configuration ----------------------------------------------------------------------------------
render() {  # render TEMPLATE: substitute @KEY@ placeholders from the variables below
    sed -e "s|@CLUSTER@|$CLUSTER|g" -e "s|@HOST@|$HOST|g" -e "s|@STATE@|$STATE|g" \
        -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" -e "s|@DBD_PORT@|$DBD_PORT|g" \
        -e "s|@DB_PORT@|$DB_PORT|g" -e "s|@DB_PASS@|$DB_PASS|g" -e "s|@PARTITION@|$PARTITION|g" \
        -e "s|@CPUS@|$CPUS|g" -e "s|@BOARDS@|$BOARDS|g" -e "s|@SOCKETS@|$SOCKETS|g" -e "s|@CORES@|$CORES|g" \
        -e "s|@THREADS@|$THREADS|g" -e "s|@REAL_MEMORY@|$REAL_MEMORY|g" \
        -e "s|@DEF_MEM_PER_CPU@|$DEF_MEM_PER_CPU|g" "$1"
}

# install_conf SRC DEST MODE: replace DEST when it differs; refuse to overwrite a file we did not write.
install_conf() {
    local src=$1 dest=$2 mode=$3
    if [[ -e $dest ]] && ! grep -q "$MARKER" "$dest"; then
        die "$dest exists and was not written by slurm/up.sh; move it away or set CLS_SLURM_CONF_DIR"
    fi
    if [[ -e $dest ]] && cmp -s "$src" "$dest"; then
        rm -f "$src"
        return 1  # unchanged
    fi
    install -m "$mode" -o root -g root "$src" "$dest"
    rm -f "$src"
    log "wrote $dest"
    return 0
}

write_configs() {
    # The machine as slurmd sees it: "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 ... RealMemory=24105"
    local detected
    detected=$(slurmd -C | head -n 1)
    field() { sed -n "s/.*\b$1=\([0-9]*\).*/\1/p" <<< "$detected"; }
    CPUS=$(field CPUs); BOARDS=$(field Boards); SOCKETS=$(field SocketsPerBoard)
    CORES=$(field CoresPerSocket); THREADS=$(field ThreadsPerCore)
    local mem; mem=$(field RealMemory)
    [[ -n $CPUS && -n $mem ]] || die "could not read the node's CPUs/memory from 'slurmd -C': $detected"
    REAL_MEMORY=$((mem * 9 / 10))  # headroom: a node reporting less than configured is drained
    DEF_MEM_PER_CPU=$((REAL_MEMORY / CPUS < 2048 ? REAL_MEMORY / CPUS : 2048))
    if [[ ! -s $STATE/etc/db.pass ]]; then
        mkdir -p "$STATE/etc"
        (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$STATE/etc/db.pass")
    fi
    DB_PASS=$(cat "$STATE/etc/db.pass")
    mkdir -p "$CONF_DIR"
    CONFIG_CHANGED=0
    render "$HERE/templates/slurm.conf.in" > "$STATE/etc/slurm.conf.new"
    install_conf "$STATE/etc/slurm.conf.new" "$CONF_DIR/slurm.conf" 644 && CONFIG_CHANGED=1
    render "$HERE/templates/slurmdbd.conf.in" > "$STATE/etc/slurmdbd.conf.new"
    install_conf "$STATE/etc/slurmdbd.conf.new" "$CONF_DIR/slurmdbd.conf" 600 || true
}

# -- daemons -------------------------------------------------------------------------------------
munge_works() { munge -n 2>/dev/null | unmunge > /dev/null 2>&1; }

start_munge() {
    if munge_works; then
        owned_pid munge > /dev/null || log "munged already running (not started by us: left alone)"
        return 0
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/mungekey --create
    fi
    install -d -m 755 -o munge -g munge /run/munge /var/log/munge /var/lib/munge
    start_daemon munge setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground --force
    wait_for "munged" munge -- munge_works
}

db() { mariadb --no-defaults -S "$DB_SOCKET" -u root "$@"; }

start_mariadb() {
    install -d -m 755 -o mysql -g mysql "$DB_RUN"
    if [[ ! -d $DB_DIR/mysql ]]; then
        install -d -m 750 -o mysql -g mysql "$DB_DIR"
        log "initializing MariaDB in $DB_DIR"
        mariadb-install-db --no-defaults --user=mysql --datadir="$DB_DIR" --skip-test-db \
            --auth-root-authentication-method=socket > "$LOG_DIR/mariadb-install.log" 2>&1 \
            || { tail -n 20 "$LOG_DIR/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
    fi
    start_daemon mariadb /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$DB_DIR" \
        --socket="$DB_SOCKET" --pid-file="$DB_RUN/mariadb.pid" --port="$DB_PORT" --bind-address=127.0.0.1 \
        --skip-name-resolve --log-error="$LOG_DIR/mariadb.log" --performance-schema=OFF \
        --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 --max-connections=100
    wait_for "MariaDB on 127.0.0.1:$DB_PORT" mariadb -- db -e "SELECT 1"
    db <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
SQL
}

register_accounting() {
    if [[ -z $(sacctmgr -n -P show cluster "$CLUSTER" format=Cluster 2>/dev/null) ]]; then
        sacctmgr -i add cluster "$CLUSTER" > /dev/null
        log "registered cluster $CLUSTER"
    fi
    if [[ -z $(sacctmgr -n -P show account "$ACCOUNT" format=Account 2>/dev/null) ]]; then
        sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER" Description="cls ablation sweeps" Organization=cls > /dev/null
        log "added account $ACCOUNT"
    fi
    if [[ -z $(sacctmgr -n -P show assoc cluster="$CLUSTER" account="$ACCOUNT" user=root format=User 2>/dev/null) ]]; then
        sacctmgr -i add user root Account="$ACCOUNT" Cluster="$CLUSTER" > /dev/null
        log "added user root to account $ACCOUNT"
    fi
}

ctld_up() { scontrol ping 2>/dev/null | grep -q "is UP"; }
node_state() { sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -n 1; }
node_ready() { [[ $(node_state) =~ ^(idle|mixed|allocated|completing)$ ]]; }

wait_node_idle() {
    local deadline=$((SECONDS + TIMEOUT)) resumed=0 state
    while :; do
        state=$(node_state || true)
        case $state in
            idle | mixed | allocated | completing) log "node $HOST is $state"; return 0 ;;
            down* | drain* | drained* | fail*)
                if ((!resumed)) && ctld_up; then
                    # After a restart the node may come back "down" (unexpected reboot) or drained.
                    scontrol update NodeName="$HOST" State=RESUME > /dev/null 2>&1 || true
                    resumed=1
                fi ;;
        esac
        if ((SECONDS >= deadline)); then
            sinfo -N -l >&2 || true
            tail_logs slurmctld slurmd
            die "timed out after ${TIMEOUT}s waiting for node $HOST to be idle (state: ${state:-unknown})"
        fi
        sleep 0.5
    done
}

main() {
    mkdir -p "$STATE" "$RUN_DIR" "$LOG_DIR" "$STATE/etc"
    install_packages
    if owned_pid slurmctld > /dev/null && owned_pid slurmd > /dev/null && owned_pid slurmdbd > /dev/null \
        && node_ready && munge_works; then
        log "cluster $CLUSTER is already up (node $HOST: $(node_state)); nothing to do"
        return 0
    fi
    write_configs
    install -d -m 755 "$STATE/slurmctld" "$STATE/slurmd"
    start_munge
    start_mariadb
    start_daemon slurmdbd /usr/sbin/slurmdbd -D
    wait_for "slurmdbd on port $DBD_PORT" slurmdbd -- sacctmgr -n show cluster
    register_accounting
    start_daemon slurmctld /usr/sbin/slurmctld -D
    wait_for "slurmctld on port $CTLD_PORT" slurmctld -- ctld_up
    if ((CONFIG_CHANGED)); then scontrol reconfigure > /dev/null 2>&1 || true; fi
    start_daemon slurmd /usr/sbin/slurmd -D
    wait_node_idle
    log "Slurm cluster $CLUSTER is up: partition $PARTITION, account $ACCOUNT, state in $STATE"
}

main "$@"
