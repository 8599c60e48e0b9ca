#!/usr/bin/env bash
# A real SLURM on this machine, for the SLURM tests (see ../shared/notes/local-slurm.md).
#   tests/slurm/local-cluster.sh up     install (Debian packages) if needed, configure, start, wait for idle nodes
#   tests/slurm/local-cluster.sh down   stop the daemons it started (by their pid files)
#   tests/slurm/local-cluster.sh status exit 0 when the nodes answer
# Idempotent: `up` on a running cluster and `down` on a stopped one are no-ops. Needs root (daemons, /etc/slurm).
# One node by default. SLURM_LOCAL_NODES=2 tests/slurm/local-cluster.sh up: two nodes, pretrain-node1 and
# pretrain-node2, each its own slurmd (`slurmd -N NAME`, own port, spool, pid and log files), both at 127.0.0.1
# (the names are added to /etc/hosts), for multi-node jobs. `up` without SLURM_LOCAL_NODES keeps the running node
# count; with another count it restarts the daemons with the new configuration (running jobs are lost). `down`
# stops every slurmd it started.
set -euo pipefail

STATE=${SLURM_LOCAL_STATE:-/tmp/pretrain-slurm}
CONF=/etc/slurm/slurm.conf
NODE_CPUS=${SLURM_LOCAL_CPUS:-4}   # SlurmdParameters=config_overrides lets the node claim more CPUs than it has
NODES=${SLURM_LOCAL_NODES:-}  # unset: the count running now (`up` of a 2-node cluster keeps it), else 1
if [ -z "$NODES" ]; then
  NODES=0
  for f in "$STATE"/slurmd-*.pid; do
    if [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; then NODES=$((NODES + 1)); fi
  done
  [ "$NODES" -gt 0 ] || NODES=1
fi
case "$NODES" in [1-8]) ;; *) echo "local-cluster: SLURM_LOCAL_NODES must be 1-8, got '$NODES'" >&2; exit 2 ;; esac

log() { echo "local-cluster: $*" >&2; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# At least $1 nodes (default 1) ready for jobs.
node_idle() { [ "$(sinfo -h -N -o '%T' 2>/dev/null | grep -cE '^(idle|mixed|allocated)')" -ge "${1:-1}" ]; }

node_names() {
  if [ "$NODES" = 1 ]; then hostname -s; else for i in $(seq "$NODES"); do echo "pretrain-node$i"; done; fi
}

# The pid files of the slurmd daemons this configuration starts (one node: slurmd.pid, as always).
slurmd_pidfiles() {
  if [ "$NODES" = 1 ]; then echo "$STATE/slurmd.pid"; return; fi
  for name in $(node_names); do echo "$STATE/slurmd-$name.pid"; done
}

# Every slurmd pid file there is alive (whatever node count started them), and there is one.
slurmds_alive() {
  local f found=
  for f in "$STATE"/slurmd*.pid; do
    [ -e "$f" ] || continue
    alive "$f" || return 1
    found=1
  done
  [ -n "$found" ]
}

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
  local slurmd_files nodes_conf name port=6818
  if [ "$NODES" = 1 ]; then
    slurmd_files="SlurmdSpoolDir=$STATE/spool/d
SlurmdPidFile=$STATE/slurmd.pid
SlurmdLogFile=$STATE/slurmd.log"
    nodes_conf="NodeName=${host} NodeAddr=127.0.0.1 CPUs=${NODE_CPUS} RealMemory=${mem:-1000} State=UNKNOWN"
  else
    slurmd_files="SlurmdSpoolDir=$STATE/spool/%n
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmdLogFile=$STATE/slurmd-%n.log"
    nodes_conf=
    for name in $(node_names); do
      nodes_conf+="NodeName=$name NodeHostname=${host} NodeAddr=127.0.0.1 Port=$port CPUs=${NODE_CPUS}"
      nodes_conf+=" RealMemory=${mem:-1000} State=UNKNOWN"$'\n'
      port=$((port + 1))
    done
    nodes_conf=${nodes_conf%$'\n'}
  fi
  cat >"$CONF" <<CONF
# Written by tests/slurm/local-cluster.sh: a ${NODES}-node test cluster.
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
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmctldLogFile=$STATE/slurmctld.log
$slurmd_files
$nodes_conf
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
}

# The names in /etc/hosts (127.0.0.1) unless they resolve already: jobs find the first node by its name.
resolve_names() {
  local name
  for name in $(node_names); do
    getent hosts "$name" >/dev/null || echo "127.0.0.1 $name  # tests/slurm/local-cluster.sh" >>/etc/hosts
  done
}

# The running cluster has the node count asked for (the nodes slurmctld knows, and a live slurmd for each).
same_nodes() {
  local f
  [ "$(sinfo -h -N -o '%N' 2>/dev/null | sort -u | wc -l)" = "$NODES" ] || return 1
  for f in $(slurmd_pidfiles); do alive "$f" || return 1; done
}

up() {
  local t0=$SECONDS f name
  if alive "$STATE/slurmctld.pid" && slurmds_alive && same_nodes && node_idle "$NODES"; then
    log "already up"; return
  fi
  install_packages
  start_munge
  if alive "$STATE/slurmctld.pid" && ! same_nodes; then
    log "restarting with $NODES node(s)"
    stop_daemons
  fi
  write_conf
  [ "$NODES" = 1 ] || resolve_names
  alive "$STATE/slurmctld.pid" || slurmctld
  for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
  if [ "$NODES" = 1 ]; then
    alive "$STATE/slurmd.pid" || slurmd
  else
    for name in $(node_names); do
      mkdir -p "$STATE/spool/$name"
      alive "$STATE/slurmd-$name.pid" || slurmd -N "$name"
    done
  fi
  for _ in $(seq 150); do
    if node_idle "$NODES"; then
      log "up in $((SECONDS - t0)) s: $(sinfo -h -N -o '%N %T %c CPUs' | paste -sd ',' -)"
      return
    fi
    sleep 0.2
  done
  log "node did not become idle; sinfo: $(sinfo -N 2>&1 | tr '\n' ' ')"
  tail -n 20 "$STATE/slurmctld.log" "$STATE"/slurmd*.log >&2 || true
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

# slurmctld and every slurmd there is a pid file for (whichever node count started them).
stop_daemons() {
  local f
  for f in "$STATE"/slurmd*.pid; do
    [ -e "$f" ] || continue
    stop_pidfile "$f"
    rm -f "$f"  # a later status must not trip over it
  done
  stop_pidfile "$STATE/slurmctld.pid"
}

down() {
  stop_daemons
  stop_pidfile /run/munge/munged.pid
  log "down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) alive "$STATE/slurmctld.pid" && slurmds_alive && node_idle ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
