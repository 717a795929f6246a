#!/usr/bin/env bash
# Two "hosts" on this machine, to try ddppo across machines (torchrun --nnodes 2, a two-node SLURM cluster) and for
# tests/test_multinode.py. As root. Each host is a network namespace with its own host name, the two joined by a
# veth pair on a private /30; both share this machine's file system, as cluster nodes share a network file system:
#
#     ddppo-n1  10.77.0.1/30  veth0 <----> veth0  10.77.0.2/30  ddppo-n2
#
# Each host resolves both names through /etc/netns/<host>/hosts: `exec` binds every entry of /etc/netns/<host>/ over
# the same name in /etc, as `ip netns exec` does (so /etc/netns/<host>/slurm/ becomes that host's /etc/slurm).
#
#   slurm/two-hosts.sh up                 create both hosts (fails if they exist: `down` first)
#   slurm/two-hosts.sh exec HOST CMD ...  run CMD on HOST (its network, its host name, its /etc/hosts)
#   slurm/two-hosts.sh kill HOST          SIGKILL every process of HOST: the host is lost
#   slurm/two-hosts.sh down               kill every process of both hosts, remove them and their /etc/netns files
#   slurm/two-hosts.sh status             the hosts, their addresses and their process count
#   slurm/two-hosts.sh list               "HOST ADDRESS" of each host, up or not
set -euo pipefail
HOSTS=(ddppo-n1 ddppo-n2)
ADDRS=(10.77.0.1 10.77.0.2)
IFACE=veth0  # the same interface name on both hosts, as on a real cluster (GLOO_SOCKET_IFNAME=veth0)

die() { echo "two-hosts: $*" >&2; exit 1; }
is_host() { local h; for h in "${HOSTS[@]}"; do [ "$h" = "$1" ] && return 0; done; return 1; }
exists() { [ -e "/run/netns/$1" ]; }  # where `ip netns add` puts it

kill_host() {  # SIGKILL until nothing runs there; bounded: processes can fork while they are being killed
  local host=$1 pids
  exists "$host" || return 0
  for _ in $(seq 50); do
    pids=$(ip netns pids "$host" 2>/dev/null || true)
    [ -z "$pids" ] && return 0
    # shellcheck disable=SC2086
    kill -9 $pids 2>/dev/null || true
    sleep 0.1
  done
  die "processes of $host survived SIGKILL: $(ip netns pids "$host" | tr '\n' ' ')"
}

up() {
  command -v ip >/dev/null || die "needs iproute2 (ip)"
  [ "$(id -u)" = 0 ] || die "needs root"
  local h
  for h in "${HOSTS[@]}"; do exists "$h" && die "$h exists already: slurm/two-hosts.sh down first"; done
  trap 'down >/dev/null 2>&1' ERR  # a failed step leaves nothing half-made
  for i in 0 1; do
    h=${HOSTS[$i]}
    ip netns add "$h"
    ip -n "$h" link set lo up
    mkdir -p "/etc/netns/$h"
    printf '127.0.0.1 localhost\n%s %s\n%s %s\n' "${ADDRS[0]}" "${HOSTS[0]}" "${ADDRS[1]}" "${HOSTS[1]}" \
      > "/etc/netns/$h/hosts"
  done
  # created in the first host's namespace, so no name is ever taken in this machine's own namespace
  ip -n "${HOSTS[0]}" link add "$IFACE" type veth peer name ddppo-peer netns "${HOSTS[1]}"
  ip -n "${HOSTS[1]}" link set ddppo-peer name "$IFACE"
  for i in 0 1; do
    ip -n "${HOSTS[$i]}" addr add "${ADDRS[$i]}/30" dev "$IFACE"
    ip -n "${HOSTS[$i]}" link set "$IFACE" up
  done
  trap - ERR
  echo "two-hosts: ${HOSTS[0]} ${ADDRS[0]} <-> ${HOSTS[1]} ${ADDRS[1]} ($IFACE)"
}

down() {
  local h
  for h in "${HOSTS[@]}"; do
    kill_host "$h"
    if exists "$h"; then ip netns del "$h"; fi
    rm -rf "/etc/netns/$h"
  done
  rmdir /etc/netns 2>/dev/null || true
}

run_on() {  # exec, so the caller's process id is the command's
  local host=$1; shift
  is_host "$host" || die "no host $host (hosts: ${HOSTS[*]})"
  exists "$host" || die "$host is not up: slurm/two-hosts.sh up"
  [ $# -gt 0 ] || die "exec $host: no command"
  # what `ip netns exec` does, less its remount of /sys (that would hide the cgroup file systems slurmd needs)
  exec nsenter --net="/run/netns/$host" -- unshare --mount --uts --propagation slave -- /bin/sh -c '
    for f in /etc/netns/"$0"/*; do [ -e "$f" ] && mount --bind "$f" "/etc/${f##*/}"; done
    hostname "$0" && exec "$@"' "$host" "$@"
}

case ${1:-} in
  up) up ;;
  down) down ;;
  exec) shift; [ $# -ge 1 ] || die "exec HOST CMD ..."; run_on "$@" ;;
  kill) [ $# -eq 2 ] && is_host "$2" || die "kill HOST (hosts: ${HOSTS[*]})"; kill_host "$2" ;;
  list) for i in 0 1; do echo "${HOSTS[$i]} ${ADDRS[$i]}"; done ;;
  status)
    for i in 0 1; do
      h=${HOSTS[$i]}
      if exists "$h"; then
        echo "$h ${ADDRS[$i]} up, $(ip netns pids "$h" | wc -l) processes"
      else
        echo "$h down"
      fi
    done ;;
  *) die "usage: $0 up | down | exec HOST CMD ... | kill HOST | status | list" ;;
esac
