#!/usr/bin/env bash
# A one-node SLURM cluster on localhost (slurmctld + slurmd + munged), for testing launch/slurm_multinode.sbatch.
#
#   scripts/local_slurm.sh install        # apt-get install slurm-wlm munge (root, Debian/Ubuntu)
#   scripts/local_slurm.sh start DIR      # config, state, logs and sockets under DIR; waits for the node
#   scripts/local_slurm.sh stop DIR       # stops the daemons started by `start DIR`
#
# After `start`, point the client commands at the cluster:  export SLURM_CONF=DIR/slurm.conf
# The node is `localhost` with CPUS (default 2) CPUs; every daemon binds to 127.0.0.1 only
# (CommunicationParameters=NoInAddrAny, NodeAddr/SlurmctldHost 127.0.0.1) on free ports. Daemons run as
# the calling user (root in CI); munged uses its own key and socket under DIR, not the system's.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"  # the daemons live there; not on every user's PATH

die() {
  echo "local_slurm: $*" >&2
  exit 1
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_for SECONDS DESCRIPTION COMMAND...: polls COMMAND until it succeeds
wait_for() {
  local seconds="$1" what="$2"
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      die "$what did not come up within ${seconds}s (logs in $dir)"
    fi
    sleep 0.5
  done
}

start() {
  for tool in munged slurmctld slurmd sinfo; do
    command -v "$tool" >/dev/null || die "$tool not found: install slurm-wlm and munge ($0 install)"
  done
  mkdir -p "$dir"/{state,spool,munge}
  dir="$(cd "$dir" && pwd)"
  chmod 700 "$dir/munge"
  local user cpus="${CPUS:-2}"
  user="$(id -un)"
  # munge: a private key, socket and daemon
  dd if=/dev/urandom of="$dir/munge/munge.key" bs=1 count=1024 status=none
  chmod 400 "$dir/munge/munge.key"
  munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed"
  wait_for 30 munged test -S "$dir/munge/munge.socket"

  cat >"$dir/slurm.conf" <<EOF
ClusterName=local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=30
MinJobAge=600
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=EXCLUSIVE
EOF
  export SLURM_CONF="$dir/slurm.conf"
  slurmctld -f "$SLURM_CONF"
  wait_for 60 slurmctld scontrol ping
  slurmd -f "$SLURM_CONF" -N localhost
  wait_for 60 "slurmd (node localhost idle)" bash -c 'sinfo -h -n localhost -o %t | grep -qx idle'
  echo "export SLURM_CONF=$SLURM_CONF"
}

stop_pidfile() {  # stop_pidfile FILE: SIGTERM the daemon in FILE and wait for it to exit
  local pid
  [[ -f "$1" ]] || return 0
  pid="$(cat "$1")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$1"
}

stop() {
  # Jobs still running end first (SIGTERM, SIGKILL after KillWait), so that no job process outlives slurmd.
  if [[ -f "$dir/slurmctld.pid" ]] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
    export SLURM_CONF="$dir/slurm.conf"
    scancel --user "$(id -un)" 2>/dev/null || true
    for _ in $(seq 90); do
      [[ -z "$(squeue -h -o %i 2>/dev/null)" ]] && break
      sleep 1
    done
  fi
  stop_pidfile "$dir/slurmd.pid"
  stop_pidfile "$dir/slurmctld.pid"
  stop_pidfile "$dir/munge/munged.pid"
}

install() {
  [[ "$(id -u)" == 0 ]] || die "install needs root"
  command -v apt-get >/dev/null || die "install needs apt-get"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge
}

case "${1:-}" in
  install) install ;;
  start | stop)
    [[ $# -eq 2 ]] || die "usage: $0 $1 DIR"
    dir="$2"
    "$1"
    ;;
  *)
    sed -n '2,10p' "$0"
    exit 2
    ;;
esac
