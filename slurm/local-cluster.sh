#!/usr/bin/env bash
# Start a real SLURM cluster on this machine (as root), for ddppo's SLURM tests and for trying the sbatch templates
# locally. Installs Debian's slurmctld, slurmd, slurm-client and munge when missing.
#   slurm/local-cluster.sh start | stop | status              one node: this machine (tests/test_slurm.py)
#   slurm/local-cluster.sh start | stop | status --nodes 2    two nodes: the hosts of slurm/two-hosts.sh (brought up
#                                                             when absent), slurmctld on the first, a slurmd on each
# The two clusters run side by side. Each host of the two-node cluster has its own network, so both clusters use
# SLURM's default ports, and its own /etc/slurm (two-hosts.sh binds /etc/netns/<host>/slurm there), so SLURM's
# commands reach the two-node cluster when run on one of its hosts:
#   slurm/two-hosts.sh exec ddppo-n1 sinfo
# Every host of it runs its own munged (one key for all, as on a cluster); `start --nodes 2` also restarts the
# daemons of a node that was lost (slurm/two-hosts.sh kill HOST), so it rejoins.
set -euo pipefail
action=${1:-start}
nodes=1
if [ $# -ge 2 ]; then
  [ "$2" = "--nodes" ] && [ $# -eq 3 ] || { echo "usage: $0 start|stop|status [--nodes 1|2]" >&2; exit 2; }
  nodes=$3
fi
case $nodes in 1|2) ;; *) echo "local-cluster: --nodes is 1 or 2, not $nodes" >&2; exit 2 ;; esac
here=$(cd "$(dirname "$0")" && pwd)
host=$(hostname -s)

install() {
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
  fi
}

# this machine's own daemons only: those of the two-node cluster run in other network namespaces
own() { pgrep --ns $$ --nslist net -x "$1"; }

munge_key() {
  mkdir -p /run/munge /var/lib/munge /var/log/munge /etc/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
  fi
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
}

start_munge() {  # this machine's own munged, for the one-node cluster
  munge_key
  own munged >/dev/null || su -s /bin/sh munge -c "/usr/sbin/munged" 2>/dev/null || /usr/sbin/munged --force
}

# shared by both clusters; $1 state dir, $2 slurmctld's pid file, $3 its log file
common_conf() {
  cat <<CONF
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$1
SlurmctldPidFile=$2
SlurmctldLogFile=$3
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
MaxArraySize=1001
KillWait=30
MinJobAge=600
CONF
}

node_resources() {
  local mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  echo "CPUs=$(nproc) RealMemory=$mem State=UNKNOWN"
}

# ------------------------------------------------------------------------------------------------ one node
write_conf_one() {
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
  {
    echo "ClusterName=ddppo-local"
    echo "SlurmctldHost=$host"
    common_conf /var/spool/slurmctld /run/slurmctld.pid /var/log/slurm/slurmctld.log
    cat <<CONF
SlurmdSpoolDir=/var/spool/slurmd
SlurmdPidFile=/run/slurmd.pid
SlurmdLogFile=/var/log/slurm/slurmd.log
JobRequeue=1
NodeName=$host $(node_resources)
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
  } > /etc/slurm/slurm.conf
}

start_one() {
  write_conf_one
  start_munge
  own slurmctld >/dev/null || /usr/sbin/slurmctld -c  # -c: no jobs left over from an earlier run
  own slurmd >/dev/null || /usr/sbin/slurmd
  for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qE "idle|mix|alloc"; then
      scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
      echo "slurm: node $host up"; exit 0
    fi
    scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
    sleep 1
  done
  echo "slurm: node did not come up; see /var/log/slurm/" >&2; exit 1
}

stop_one() {
  local d pid
  for d in slurmd slurmctld munged; do
    for pid in $(own "$d"); do kill "$pid" 2>/dev/null || true; done
  done
}

# ------------------------------------------------------------------------------------------------ two nodes
mapfile -t HOSTS < <("$here/two-hosts.sh" list | cut -d' ' -f1)
mapfile -t ADDRS < <("$here/two-hosts.sh" list | cut -d' ' -f2)
on() { "$here/two-hosts.sh" exec "$@"; }
two_run=/run/slurm-two  # pid files: slurmctld.pid, slurmd-<node>.pid
two_munge=/run/munge-two  # munged-<node>.pid, munge-<node>.socket (the munge user's)

write_conf_two() {
  mkdir -p /etc/slurm /var/spool/slurmctld-two /var/spool/slurmd-two /var/log/slurm "$two_run"
  local h
  for h in "${HOSTS[@]}"; do
    mkdir -p "/etc/netns/$h/slurm"
    conf_two "$h" > "/etc/netns/$h/slurm/slurm.conf"
  done
}

conf_two() {  # $1: the host whose slurm.conf this is (its own munge socket)
  local h=$1
  {
    echo "ClusterName=ddppo-two"
    echo "SlurmctldHost=${HOSTS[0]}(${ADDRS[0]})"
    common_conf /var/spool/slurmctld-two "$two_run/slurmctld.pid" /var/log/slurm/two-slurmctld.log
    cat <<CONF
# cred_expire: how long a requeued job waits before it starts again (SLURM's default 120 s), for the job step
# credentials of its last run to expire on every node
AuthInfo=socket=$two_munge/munge-$h.socket,cred_expire=20
SlurmdSpoolDir=/var/spool/slurmd-two/%n
SlurmdPidFile=$two_run/slurmd-%n.pid
SlurmdLogFile=/var/log/slurm/two-slurmd-%n.log
# a node that stops answering is DOWN after 10 s (SLURM's default: 300); its jobs are requeued only if they
# asked (--requeue): JobRequeue=0, as on clusters where jobs are not requeued unless they ask
SlurmdTimeout=10
JobRequeue=0
# each host's slurm.conf names its own munge socket: not a configuration mismatch worth a warning
DebugFlags=NO_CONF_HASH
NodeName=${HOSTS[0]} NodeAddr=${ADDRS[0]} $(node_resources)
NodeName=${HOSTS[1]} NodeAddr=${ADDRS[1]} $(node_resources)
PartitionName=debug Nodes=${HOSTS[0]},${HOSTS[1]} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
  }
}

alive() {  # $1 pid file, $2 daemon name; a killed daemon's pid can linger as a zombie of the same name
  local pid stat
  [ -s "$1" ] && pid=$(cat "$1") && stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
  [[ $stat == "$pid ($2) "[^Z]* ]]
}

start_two() {
  local h up clean=""
  if [[ $("$here/two-hosts.sh" status) != "${HOSTS[0]} ${ADDRS[0]} up"* ]]; then
    "$here/two-hosts.sh" up
    clean=-c  # new hosts: no jobs left over from an earlier cluster (a restarted controller recovers its jobs)
  fi
  write_conf_two
  munge_key
  mkdir -p "$two_munge" && chown munge:munge "$two_munge"
  for h in "${HOSTS[@]}"; do
    alive "$two_munge/munged-$h.pid" munged || on "$h" su -s /bin/sh munge -c "/usr/sbin/munged \
      --socket=$two_munge/munge-$h.socket --pid-file=$two_munge/munged-$h.pid \
      --seed-file=/var/lib/munge/two-$h.seed --log-file=/var/log/munge/two-$h.log"
  done
  alive "$two_run/slurmctld.pid" slurmctld || on "${HOSTS[0]}" /usr/sbin/slurmctld $clean
  for h in "${HOSTS[@]}"; do
    alive "$two_run/slurmd-$h.pid" slurmd || on "$h" /usr/sbin/slurmd -N "$h"
  done
  for _ in $(seq 60); do
    up=$(on "${HOSTS[0]}" sinfo -h -N -o "%N %T" 2>/dev/null | grep -cE " (idle|mixed|allocated|completing)$" || true)
    if [ "$up" = 2 ]; then echo "slurm: nodes ${HOSTS[*]} up"; exit 0; fi
    for h in "${HOSTS[@]}"; do on "${HOSTS[0]}" scontrol update nodename="$h" state=resume >/dev/null 2>&1 || true; done
    sleep 1
  done
  echo "slurm: the two nodes did not come up; see /var/log/slurm/two-*" >&2; exit 1
}

stop_two() {
  local f
  for f in "$two_run"/*.pid "$two_munge"/*.pid; do
    if alive "$f" slurmd || alive "$f" slurmctld || alive "$f" munged; then kill "$(cat "$f")" 2>/dev/null || true; fi
  done
}

case $action:$nodes in
  start:1) install; start_one ;;
  stop:1) stop_one ;;
  status:1) sinfo ;;
  start:2) install; start_two ;;
  stop:2) stop_two ;;
  status:2) on "${HOSTS[0]}" sinfo -N ;;
  *) echo "usage: $0 start|stop|status [--nodes 1|2]" >&2; exit 2 ;;
esac
