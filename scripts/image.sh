#!/usr/bin/env bash
# The worker image from docker/Dockerfile, built here with podman (no Docker engine, no registry).
#   scripts/image.sh setup   install podman, runc and debootstrap from Debian's packages if missing
#   scripts/image.sh base    python:3.11-slim: a stand-in built from Debian bookworm's packages
#                            (this machine cannot pull images), cached in $IMAGE_CACHE
#   scripts/image.sh build   setup, base, then the image; prints its size and build time
#   scripts/image.sh run ARGS...      podman run with the flags containers need on this machine
#   scripts/image.sh podman ARGS...   podman with the flags that work on this machine
# Environment: IMAGE_TAG (default llm-streams:test), IMAGE_CACHE (default .stack/image),
# IMAGE_STANDIN_REBUILD=1 rebuilds the stand-in from scratch.
# Elsewhere docker/Dockerfile builds on the real python:3.11-slim as it is.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tag=${IMAGE_TAG:-llm-streams:test}
cache=${IMAGE_CACHE:-$root/.stack/image}
base=python:3.11-slim
standin_tar=$cache/python-3.11-slim-standin.tar
standin_label=org.llm-streams.standin

log() { echo "[image] $*" >&2; }

# runc: crun fails on this machine's cgroup set-up; cgroupfs: no systemd here.
pm() { podman --runtime runc --cgroup-manager cgroupfs "$@"; }

setup() {
  local missing=()
  command -v podman >/dev/null 2>&1 || missing+=(podman)
  command -v runc >/dev/null 2>&1 || missing+=(runc)
  command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
  if [ ${#missing[@]} = 0 ]; then return; fi
  log "installing ${missing[*]} from Debian's packages"
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq -o DPkg::Lock::Timeout=600 \
    "${missing[@]}" >&2
}

# The Debian mirror apt already uses here (so nothing else is contacted).
mirror() {
  local uri
  uri=$(grep -hoE '^URIs: *\S+/debian$' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1 \
        | sed 's/^URIs: *//') || true
  if [ -z "$uri" ]; then
    uri=$(grep -hoE '^deb +\S+/debian ' /etc/apt/sources.list 2>/dev/null | head -n 1 \
          | awk '{print $2}') || true
  fi
  [ -n "$uri" ] || { log "no Debian mirror found in apt's sources"; exit 2; }
  echo "$uri"
}

standin_rootfs() { # dir
  local dir=$1
  log "debootstrap --variant=minbase bookworm (python3, pip, venv): a few minutes, once"
  rm -rf "$dir"
  debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
    bookworm "$dir" "$(mirror)" >"$cache/debootstrap.log" 2>&1 \
    || { tail -n 20 "$cache/debootstrap.log" >&2; exit 1; }
  # This machine's CA bundle (registries may be reached through its proxy), pip allowed into
  # the system Python as in the real image, and `python` on the PATH as there.
  cp /etc/ssl/certs/ca-certificates.crt "$dir/etc/ssl/certs/ca-certificates.crt"
  rm -f "$dir"/usr/lib/python3*/EXTERNALLY-MANAGED
  ln -sf /usr/bin/python3 "$dir/usr/local/bin/python"
  rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/* "$dir"/tmp/*
}

base() {
  mkdir -p "$cache"
  if [ -n "${IMAGE_STANDIN_REBUILD:-}" ]; then rm -f "$standin_tar"; fi
  if [ -z "${IMAGE_STANDIN_REBUILD:-}" ] && pm image exists "$base" \
     && [ -n "$(pm image inspect --format "{{index .Labels \"$standin_label\"}}" "$base")" ]; then
    log "$base is the local stand-in (Debian bookworm's python3 from debootstrap, not the official image)"
    return
  fi
  if pm image exists "$base" && [ -z "${IMAGE_STANDIN_REBUILD:-}" ]; then
    log "$base present and not our stand-in: using it as it is"
    return
  fi
  if [ ! -f "$standin_tar" ]; then
    local dir=$cache/rootfs
    standin_rootfs "$dir"
    tar -C "$dir" --numeric-owner -cf "$standin_tar.part" .
    mv "$standin_tar.part" "$standin_tar"
    rm -rf "$dir"
  fi
  log "importing $base: a STAND-IN built with debootstrap from Debian bookworm's python3," \
      "pip and venv, not the official image (this machine cannot pull from registries)"
  pm import --change "LABEL $standin_label=debootstrap-bookworm" \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
    "$standin_tar" "$base" >"$cache/import.log" 2>&1 || { cat "$cache/import.log" >&2; exit 1; }
}

build() {
  setup
  base
  log "podman build -f docker/Dockerfile -t $tag (on $base)"
  local start end size
  start=$(date +%s.%N)
  pm build --network host --pull=never -f "$root/docker/Dockerfile" -t "$tag" "$root" \
    >"$cache/build.log" 2>&1 || { tail -n 40 "$cache/build.log" >&2; exit 1; }
  end=$(date +%s.%N)
  size=$(pm image inspect --format '{{.Size}}' "$tag")
  awk -v t="$tag" -v s="$size" -v a="$start" -v b="$end" \
    'BEGIN { printf "[image] built %s in %.1f s; size %.0f MB (%d bytes)\n", t, b - a, s / 1e6, s }' >&2
}

case "${1:-build}" in
  setup) setup ;;
  base) setup; base ;;
  build) build ;;
  # The default rlimits of the runtime are above what this sandbox lets a process set.
  run) shift; pm run --network host --ulimit nofile=20000:20000 --ulimit nproc=4096:4096 "$@" ;;
  podman) shift; pm "$@" ;;
  *) echo "usage: $0 setup|base|build|run|podman ARGS..." >&2; exit 2 ;;
esac
