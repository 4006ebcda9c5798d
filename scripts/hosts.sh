#!/usr/bin/env bash
# Worker hosts on one machine, for real networking without Docker: each host is a Linux network
# namespace with its own address on a bridge, reaching this machine's PostgreSQL, RabbitMQ and Redis at
# the bridge's address. Those services listen on 127.0.0.1 only, so a socat forwarder per port listens on
# the bridge address and connects to 127.0.0.1 (nothing in the services' configuration changes).
#
#   scripts/hosts.sh up [-n NAME] [-p PORTS] COUNT   hosts NAME-1 .. NAME-COUNT; prints GATEWAY=, HOST_i=
#   scripts/hosts.sh exec [-n NAME] I CMD [ARG...]   run CMD on host I (it replaces this script)
#   scripts/hosts.sh down [-n NAME]                  stop what runs on the hosts and the forwarders, remove
#                                                    the namespaces, links and bridge: nothing is left
#   scripts/hosts.sh show [-n NAME]                  what `up` printed, while the hosts exist
#   scripts/hosts.sh cut [-n NAME] I                 partition host I: its link goes down (packets are
#                                                    dropped, connections hang as on a real partition)
#   scripts/hosts.sh heal [-n NAME] I                bring host I's link back up
#
# NAME (default orch): 1-8 lowercase letters or digits, so several sets of hosts can coexist; PORTS
# (default "5432 5672 6379") are forwarded from GATEWAY:PORT to 127.0.0.1:PORT. Needs root, iproute2,
# socat and flock. A worker host runs the same commands as any other host, with the gateway's address in
# its URLs and a node name of its own (the namespaces share this machine's host name):
#
#   scripts/hosts.sh up 2
#   ORCH_DATABASE_URL=postgresql://orch@10.213.0.1/orch ORCH_BROKER_URL=amqp://orch:pw@10.213.0.1// \
#     scripts/hosts.sh exec 1 orchestrator worker io -c 8 --hostname io@orch-1
#   scripts/hosts.sh down
set -euo pipefail

STATE_ROOT=${ORCH_HOSTS_STATE:-/run/orchestrator-hosts}
SUBNET_PREFIX=10.213  # hosts get 10.213.X.(10+i), the bridge 10.213.X.1, X the first free /24

usage() {
  sed -n '2,24s/^# \{0,1\}//p' "$0" >&2
  exit 2
}

die() {
  echo "hosts.sh: $*" >&2
  exit 1
}

name=orch
ports="5432 5672 6379"
parse_options() {
  OPTIND=1
  while getopts "n:p:h" opt; do
    case $opt in
      n) name=$OPTARG ;;
      p) ports=$OPTARG ;;
      *) usage ;;
    esac
  done
  [[ $name =~ ^[a-z0-9]{1,8}$ ]] || die "NAME must be 1-8 lowercase letters or digits, got '$name'"
  state=$STATE_ROOT/$name
  bridge=${name}-br
}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# The first 10.213.X.0/24 no interface of this machine uses (under a lock: two `up`s at once differ).
free_subnet() {
  local x used
  used=$(ip -4 -o addr show | awk '{print $4}')
  for x in $(seq 0 255); do
    grep -q "^$SUBNET_PREFIX\.$x\." <<<"$used" || { echo "$SUBNET_PREFIX.$x"; return 0; }
  done
  die "no free $SUBNET_PREFIX.X.0/24 left"
}

up() {
  local count=${1:-}
  [[ $count =~ ^[1-9][0-9]?$ ]] || die "COUNT must be 1-99, got '${count}'"
  [[ $(id -u) == 0 ]] || die "needs root (network namespaces)"
  command -v socat >/dev/null || die "socat is missing: apt-get install -y socat"
  [[ ! -e $state ]] || die "hosts '$name' exist already ($state): scripts/hosts.sh down -n $name"
  mkdir -p "$STATE_ROOT" "$state"
  # Whatever stops `up` half-way (a failed command, a forwarder that does not come up) undoes it all.
  trap 'down >/dev/null 2>&1 || true' EXIT
  local subnet gateway i ns veth
  exec 9<"$STATE_ROOT"
  flock 9
  subnet=$(free_subnet)
  gateway=$subnet.1
  ip link add "$bridge" type bridge
  ip addr add "$gateway/24" dev "$bridge"
  ip link set "$bridge" up
  flock -u 9
  echo "GATEWAY=$gateway" >"$state/info"
  for i in $(seq "$count"); do
    ns=$name-$i
    veth=${name}-v$i
    ip netns add "$ns"
    ip link add "$veth" type veth peer name eth0 netns "$ns"
    ip link set "$veth" master "$bridge" up
    ip -n "$ns" addr add "$subnet.$((10 + i))/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    ip -n "$ns" route add default via "$gateway"
    echo "HOST_$i=$subnet.$((10 + i))" >>"$state/info"
  done
  for port in $ports; do
    # Its own session: down kills the listener and every connection it forked, by process group.
    setsid socat "TCP-LISTEN:$port,bind=$gateway,reuseaddr,fork" "TCP:127.0.0.1:$port" \
      </dev/null >>"$state/socat.log" 2>&1 &
    echo $! >>"$state/forwarders"
  done
  for port in $ports; do
    for _ in $(seq 100); do port_open "$gateway" "$port" && break; sleep 0.05; done
    port_open "$gateway" "$port" || die "the forwarder of port $port did not come up: $(cat "$state/socat.log")"
  done
  trap - EXIT
  cat "$state/info"
}

# Every process in namespace $1, then its namespace.
empty_namespace() {
  local ns=$1 pids _
  pids=$(ip netns pids "$ns" 2>/dev/null || true)
  if [[ -n $pids ]]; then
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 100); do
      pids=$(ip netns pids "$ns" 2>/dev/null || true)
      [[ -z $pids ]] && break
      sleep 0.1
    done
    [[ -z $pids ]] || kill -KILL $pids 2>/dev/null || true
  fi
  ip netns del "$ns" 2>/dev/null || true
}

down() {
  local ns pid link
  for ns in $(ip netns list | awk '{print $1}' | grep -E "^$name-[0-9]+$" || true); do
    empty_namespace "$ns"
  done
  if [[ -f $state/forwarders ]]; then
    while read -r pid; do
      kill -TERM -- "-$pid" 2>/dev/null || true
    done <"$state/forwarders"
  fi
  # A namespace's removal takes its end of each veth pair with it; what is left here goes too.
  for link in $(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E "^$name-v[0-9]+$" || true); do
    ip link del "$link" 2>/dev/null || true
  done
  ip link del "$bridge" 2>/dev/null || true
  rm -rf "$state"
  rmdir "$STATE_ROOT" 2>/dev/null || true  # the last set of hosts gone: no directory either
}

cmd=${1:-}
[[ -n $cmd ]] || usage
shift
parse_options "$@"
shift $((OPTIND - 1))
case $cmd in
  up) up "$@" ;;
  down) down ;;
  show) [[ -f $state/info ]] || die "no hosts '$name'"; cat "$state/info" ;;
  cut | heal)
    i=${1:-}
    [[ $i =~ ^[1-9][0-9]?$ ]] || die "$cmd needs a host number, got '${i}'"
    ip link show "$name-v$i" >/dev/null 2>&1 || die "no host $name-$i"
    if [[ $cmd == cut ]]; then ip link set "$name-v$i" down; else ip link set "$name-v$i" up; fi
    ;;
  exec)
    i=${1:-}
    [[ $i =~ ^[1-9][0-9]?$ ]] || die "exec needs a host number, got '${i}'"
    shift
    [[ $# -gt 0 ]] || die "exec needs a command"
    ip netns list | awk '{print $1}' | grep -qx "$name-$i" || die "no host $name-$i"
    exec ip netns exec "$name-$i" "$@"
    ;;
  *) usage ;;
esac
