#!/usr/bin/env bash
# Start, stop or check a one-node SLURM cluster on this machine (CI and local tests).
#
#   tools/slurm_local.sh start    install slurm if missing (Debian, root), write slurm.conf, start
#                                 slurmctld + slurmd, wait until the node is idle
#   tools/slurm_local.sh stop     stop the daemons this script started (by their pid files)
#   tools/slurm_local.sh status   exit 0 when the cluster answers and the node can run jobs
#
# The node is this machine (its hostname, CPU count, memory a bit under the total).
# Auth is auth/none + cred/none: a single-machine test cluster, never a shared one.
# cred_expire=10 lets a requeued job become eligible after ~11 s instead of 121 s, and
# sched_interval=2 lets the scheduler notice it then (the default looks every 60 s).
#
# Environment:
#   SLURM_CONF         where slurm.conf is written (default /etc/slurm/slurm.conf, the path the
#                      clients read without any setting)
#   EVA_SLURM_STATE    state, spool, logs and pid files (default /var/tmp/eva-slurm)
set -euo pipefail

conf="${SLURM_CONF:-/etc/slurm/slurm.conf}"
state="${EVA_SLURM_STATE:-/var/tmp/eva-slurm}"
export SLURM_CONF="$conf"

die() { echo "slurm_local.sh: $*" >&2; exit 1; }

ensure_installed() {
    # The daemons do not need shellcheck, but the tests lint the sbatch scripts with it.
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v shellcheck >/dev/null; then
        return
    fi
    [[ $(id -u) -eq 0 ]] || die "slurm is not installed and we are not root; run: sudo apt-get install -y slurmctld slurmd slurm-client shellcheck"
    command -v apt-get >/dev/null || die "slurm is not installed and apt-get is missing; install slurmctld, slurmd, slurm-client and shellcheck by hand"
    local pkgs=(slurmctld slurmd slurm-client shellcheck)
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "${pkgs[@]}" >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y -q "${pkgs[@]}" >/dev/null; } \
        || die "apt-get install ${pkgs[*]} failed; check the Debian mirror"
}

write_conf() {
    local host cpus mem_mb
    host=$(hostname -s)
    cpus=$(nproc --all)
    # Leave 1 GiB (or a quarter on tiny machines) to the OS so slurmd never marks the node invalid.
    mem_mb=$(awk '/MemTotal/ {t=int($2/1024); r=t-1024; if (r < t*3/4) r=int(t*3/4); print r}' /proc/meminfo)
    mkdir -p "$(dirname "$conf")" "$state/ctld" "$state/spool" "$state/log"
    cat >"$conf" <<CONF
# Written by tools/slurm_local.sh: a one-node test cluster on $host.
ClusterName=evalocal
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=300
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
}

node_ready() {
    # "idle", "mixed" or "allocated" all mean the node takes jobs; down/drain/unknown do not.
    local st
    st=$(sinfo -h -N -o '%T' 2>/dev/null | head -n1) || return 1
    [[ $st == idle* || $st == mixed* || $st == allocated* || $st == completing* ]]
}

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
    ensure_installed
    if pid_alive "$state/slurmctld.pid" && pid_alive "$state/slurmd.pid" && node_ready; then
        echo "slurm_local.sh: already running ($conf)"
        return
    fi
    write_conf
    pid_alive "$state/slurmctld.pid" || slurmctld -c -f "$conf" || die "slurmctld failed to start; see $state/log/slurmctld.log"
    pid_alive "$state/slurmd.pid" || slurmd -f "$conf" || die "slurmd failed to start; see $state/log/slurmd.log"
    local i
    for i in $(seq 1 60); do
        if node_ready; then
            echo "slurm_local.sh: node $(hostname -s) ready ($conf, logs in $state/log)"
            return
        fi
        # A node left DOWN by an earlier unclean stop comes back with RESUME.
        if (( i == 10 )); then scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true; fi
        sleep 0.5
    done
    die "node not ready after 30 s (sinfo: $(sinfo -h -N -o '%T %E' 2>&1 | head -n1)); see $state/log"
}

stop_daemon() {
    local pidfile=$1 pid i
    pid_alive "$pidfile" || return 0
    pid=$(cat "$pidfile")
    kill "$pid"
    for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
}

stop() {
    stop_daemon "$state/slurmd.pid"
    stop_daemon "$state/slurmctld.pid"
    echo "slurm_local.sh: stopped"
}

status() {
    pid_alive "$state/slurmctld.pid" && pid_alive "$state/slurmd.pid" && node_ready
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: tools/slurm_local.sh start|stop|status" ;;
esac
