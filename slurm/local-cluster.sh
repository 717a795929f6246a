#!/usr/bin/env bash
# Start a real one-node SLURM cluster on this machine (as root), for ddppo's SLURM tests and for trying the sbatch
# templates locally. Installs Debian's slurmctld, slurmd, slurm-client and munge when missing.
#   slurm/local-cluster.sh start | stop | status
set -euo pipefail
action=${1:-start}
conf_dir=/etc/slurm
state=/var/spool/slurmctld
host=$(hostname -s)

install() {
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
  fi
}

write_conf() {
  mkdir -p "$conf_dir" "$state" /var/spool/slurmd /var/log/slurm /run/munge /var/lib/munge /var/log/munge
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  cat > "$conf_dir/slurm.conf" <<CONF
ClusterName=ddppo-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$state
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
MaxArraySize=1001
KillWait=30
MinJobAge=600
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
  fi
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
}

case $action in
  start)
    install
    write_conf
    pgrep -x munged >/dev/null || su -s /bin/sh munge -c "/usr/sbin/munged" 2>/dev/null || /usr/sbin/munged --force
    pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld -c  # -c: no jobs left over from an earlier run
    pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
    for _ in $(seq 60); do
      if sinfo -h -o %T 2>/dev/null | grep -qE "idle|mix|alloc"; then
        scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
        echo "slurm: node $host up"; exit 0
      fi
      scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
      sleep 1
    done
    echo "slurm: node did not come up; see /var/log/slurm/" >&2; exit 1
    ;;
  stop)
    pkill -x slurmd || true; pkill -x slurmctld || true; pkill -x munged || true
    ;;
  status)
    sinfo
    ;;
esac
