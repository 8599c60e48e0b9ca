#!/usr/bin/env bash
# A real single-node SLURM on this machine, for the SLURM tests (see ../shared/notes/local-slurm.md).
#   tests/slurm/local-cluster.sh up     install (Debian packages) if needed, configure, start, wait for an idle node
#   tests/slurm/local-cluster.sh down   stop the daemons it started (by their pid files)
#   tests/slurm/local-cluster.sh status exit 0 when the node answers
# Idempotent: `up` on a running cluster and `down` on a stopped one are no-ops. Needs root (daemons, /etc/slurm).
set -euo pipefail

STATE=${SLURM_LOCAL_STATE:-/tmp/pretrain-slurm}
CONF=/etc/slurm/slurm.conf
NODE_CPUS=${SLURM_LOCAL_CPUS:-4}   # SlurmdParameters=config_overrides lets the node claim more CPUs than it has

log() { echo "local-cluster: $*" >&2; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

node_idle() { sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null; then
    return
  fi
  log "installing slurmctld slurmd slurm-client munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

start_munge() {
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1024 count=1 of=/etc/munge/munge.key status=none
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
  if ! alive /run/munge/munged.pid; then
    runuser -u munge -- /usr/sbin/munged
  fi
  for _ in $(seq 50); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
    sleep 0.1
  done
  log "munged does not answer"; return 1
}

write_conf() {
  local host mem
  host=$(hostname -s)
  mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
  mkdir -p "$STATE/spool/ctld" "$STATE/spool/d" /etc/slurm
  cat >"$CONF" <<CONF
# Written by tests/slurm/local-cluster.sh: a one-node test cluster.
ClusterName=pretrain-test
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
SlurmdParameters=config_overrides
KillWait=30
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/jobcomp.txt
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${NODE_CPUS} RealMemory=${mem:-1000} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
}

up() {
  local t0=$SECONDS
  if alive "$STATE/slurmctld.pid" && alive "$STATE/slurmd.pid" && node_idle; then
    log "already up"; return
  fi
  install_packages
  start_munge
  write_conf
  alive "$STATE/slurmctld.pid" || slurmctld
  for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
  alive "$STATE/slurmd.pid" || slurmd
  for _ in $(seq 150); do
    if node_idle; then
      log "up in $((SECONDS - t0)) s: $(sinfo -h -N -o '%N %T %c CPUs')"
      return
    fi
    sleep 0.2
  done
  log "node did not become idle; sinfo: $(sinfo -N 2>&1 | tr '\n' ' ')"
  tail -n 20 "$STATE/slurmctld.log" "$STATE/slurmd.log" >&2 || true
  return 1
}

stop_pidfile() {
  local f=$1
  alive "$f" || return 0
  local pid
  pid=$(cat "$f")
  kill "$pid"
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}

down() {
  stop_pidfile "$STATE/slurmd.pid"
  stop_pidfile "$STATE/slurmctld.pid"
  stop_pidfile /run/munge/munged.pid
  log "down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) alive "$STATE/slurmctld.pid" && alive "$STATE/slurmd.pid" && node_idle ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
