#!/usr/bin/env bash
# Podman instead of a Docker engine, for the container tests (tests/integration/test_containers.py) and for
# anyone who runs docker-compose.yml without Docker. As root, on Debian:
#
#   scripts/containers.sh            install podman, runc, debootstrap (Debian's packages) when missing;
#                                    write a podman configuration; make the local base image when it is
#                                    missing; build the project's image on it (cached layers are reused)
#   scripts/containers.sh env        the variables podman and podman-compose need, for eval:
#                                    eval "$(scripts/containers.sh env)"
#
# The configuration (ORCH_PODMAN_CONFIG, default ~/.config/celery-orchestrator/podman) is what podman
# needs on a kernel where its default runtime cannot run containers (crun: "setrlimit RLIMIT_NOFILE:
# Operation not permitted" under cgroup v1, without systemd): runc, cgroupfs, a file event log. Nothing in
# /etc is changed; CONTAINERS_CONF and CONTAINERS_STORAGE_CONF select it.
#
# No image registry is needed: the base image is Debian (the release and mirror apt already uses) with
# Debian's python3, made by debootstrap and imported into podman (about 40 s, once per machine). It also
# carries this machine's CA certificates, so that pip inside a build can reach the package index through
# a TLS-intercepting proxy. The Dockerfile takes it as PYTHON_IMAGE; its default stays python:3.11-slim.
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG_DIR=${ORCH_PODMAN_CONFIG:-${XDG_CONFIG_HOME:-$HOME/.config}/celery-orchestrator/podman}
IMAGE=${ORCH_IMAGE:-localhost/celery-orchestrator:latest}
BUILD_CACHE=localhost/celery-orchestrator-build:latest
# Bump when the recipe of the base image changes, so that machines that keep the old one make it again.
BASE_RECIPE=1
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt

log() { echo "containers.sh: $*" >&2; }
die() { log "$*"; exit 1; }

codename() { . /etc/os-release && echo "${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}"; }

base_image() { echo "localhost/celery-orchestrator-base:$(codename)-$BASE_RECIPE"; }

print_env() {
  cat <<EOF
export CONTAINERS_CONF=$CONFIG_DIR/containers.conf
export CONTAINERS_STORAGE_CONF=$CONFIG_DIR/storage.conf
export PYTHON_IMAGE=$(base_image)
EOF
}

install_packages() {
  local wanted=(podman runc debootstrap catatonit slirp4netns) missing=() p
  for p in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || die "needs root to install ${missing[*]}"
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

configure() {
  mkdir -p "$CONFIG_DIR"
  cat >"$CONFIG_DIR/containers.conf" <<'EOF'
# Written by scripts/containers.sh. crun cannot set RLIMIT_NOFILE on this kind of kernel (cgroup v1);
# there is no systemd to manage cgroups or keep the event journal.
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
  cat >"$CONFIG_DIR/storage.conf" <<'EOF'
# Written by scripts/containers.sh: podman's usual places, kept between runs (the base image and the
# build cache live here).
[storage]
driver = "overlay"
runroot = "/run/containers/storage"
graphroot = "/var/lib/containers/storage"
EOF
  print_env >"$CONFIG_DIR/podman.env"
  eval "$(print_env)"
}

apt_mirror() {
  local uri=""
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    uri=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources)
  fi
  if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
    uri=$(awk '$1 == "deb" && $2 !~ /^\[/ && $2 !~ /security/ { print $2; exit }' /etc/apt/sources.list)
  fi
  echo "${uri:-http://deb.debian.org/debian}"
}

ca_digest() { sha256sum "$CA_BUNDLE" | cut -d' ' -f1; }

ROOTFS=""
trap '[ -z "$ROOTFS" ] || rm -rf "$ROOTFS"' EXIT

make_base_image() {
  local image digest log=$CONFIG_DIR/debootstrap.log
  image=$(base_image)
  digest=$(ca_digest)
  if podman image exists "$image" &&
    [ "$(podman image inspect --format '{{ index .Labels "ca-sha256" }}' "$image")" = "$digest" ]; then
    log "base image $image is there"
    return 0
  fi
  ROOTFS=$(mktemp -d /var/tmp/orchestrator-rootfs.XXXXXX)
  log "making base image $image: debootstrap $(codename) from $(apt_mirror)"
  debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
    "$(codename)" "$ROOTFS" "$(apt_mirror)" >"$log" 2>&1 ||
    { tail -20 "$log" >&2; die "debootstrap failed (log: $log)"; }
  cp "$CA_BUNDLE" "$ROOTFS/etc/ssl/certs/host-ca-certificates.crt"
  chroot "$ROOTFS" apt-get clean
  rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/log/*.log
  tar -C "$ROOTFS" -c . | podman import --quiet \
    --change "ENV PIP_CERT=/etc/ssl/certs/host-ca-certificates.crt" \
    --change "ENV SSL_CERT_FILE=/etc/ssl/certs/host-ca-certificates.crt" \
    --change "LABEL ca-sha256=$digest" \
    --change 'CMD ["/bin/bash"]' \
    - "$image" >/dev/null
  rm -rf "$ROOTFS"
  podman run --rm "$image" python -c "import ssl, venv" || die "the base image $image cannot run Python"
}

build_image() {
  local started=$SECONDS args=(--build-arg PYTHON_IMAGE="$(base_image)")
  log "building $IMAGE on $(base_image)"
  # The build stage gets a name too, so that pruning the untagged images of earlier builds (each one
  # after a code change is some 250 MB) keeps the layer of downloaded wheels for the next build.
  { podman build "${args[@]}" --target build -t "$BUILD_CACHE" . &&
    podman build "${args[@]}" -t "$IMAGE" .; } >"$CONFIG_DIR/build.log" 2>&1 ||
    { tail -30 "$CONFIG_DIR/build.log" >&2; die "podman build failed (log: $CONFIG_DIR/build.log)"; }
  podman image prune --force >/dev/null
  log "built $IMAGE in $((SECONDS - started)) s"
}

case "${1:-setup}" in
  env) print_env ;;
  setup)
    started=$SECONDS
    install_packages
    configure
    make_base_image
    build_image
    log "ready in $((SECONDS - started)) s; for podman and podman-compose:"
    log '  eval "$(scripts/containers.sh env)"'
    ;;
  *) sed -n '2,20s/^# \{0,1\}//p' "$0" >&2; exit 2 ;;
esac
