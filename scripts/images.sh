#!/usr/bin/env bash
# Build the Dockerfile's images where there is no Docker engine, with podman (README "Images").
#
#   scripts/images.sh setup               podman + runc + mmdebstrap, containers.conf, the base image
#   scripts/images.sh build [TARGET...]   build serving, serving-tf, workbench (default: all three)
#   scripts/images.sh tags                the image names, one per line (TARGET=IMAGE)
#   scripts/images.sh engine              the engine the images are in: docker (an engine runs) or podman
#
# With a Docker engine, `build` runs the same `docker build --target ... -t ... .` commands and
# `setup` does nothing: the Dockerfile's base (python:3.11-slim-bookworm) comes from Docker Hub.
#
# Without one (these machines): no image registry is reachable, so the base is made here,
# `mmdebstrap --variant=minbase bookworm` plus Debian's python3, imported as
# localhost/python:3.11-slim-bookworm (the short name the Dockerfile names resolves to it). podman
# needs runc, the cgroupfs manager and lower default ulimits than it asks for (this sandbox refuses
# raising them): scripts/containers.conf, installed as /etc/containers/containers.conf when that
# file is missing, and always handed to podman through CONTAINERS_CONF.
#
# pip inside the build reaches the package index the way pip does on this machine: its
# configuration (`pip config list`: index, certificate, wheel folders, constraints) is written to a
# pip.conf outside the build context and mounted, with the files and folders it names, read-only
# for the build's RUN steps: never copied into an image or the repository.
#
# The podman cache is reused: a second build with unchanged pyproject.toml and constraints.txt
# re-runs only the layer that installs the project's own code.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=localhost/python:3.11-slim-bookworm
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
declare -A IMAGE=([serving]=workbench-api [serving-tf]=workbench-api-tf [workbench]=workbench)
TARGETS=(serving serving-tf workbench)

say() { printf 'images: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

docker_engine() { command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; }

podman_env() {
  export CONTAINERS_CONF="$PWD/scripts/containers.conf"
}

setup() {
  if docker_engine; then say "a Docker engine runs here: nothing to set up"; return; fi
  local need=()
  for tool in podman runc mmdebstrap; do command -v "$tool" >/dev/null || need+=("$tool"); done
  if ((${#need[@]})); then
    ((EUID == 0)) || die "${need[*]} missing: install them as root (apt-get install podman runc mmdebstrap), or run setup as root"
    say "installing ${need[*]} (Debian packages)"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman runc mmdebstrap >/dev/null
  fi
  if [[ ! -e /etc/containers/containers.conf && $EUID -eq 0 ]]; then
    install -D -m 0644 scripts/containers.conf /etc/containers/containers.conf
  fi
  podman_env
  if podman image exists "$BASE"; then
    say "base image $BASE is here"
    return
  fi
  say "making $BASE: Debian $SUITE minbase with python3 (mmdebstrap)"
  local tarball
  tarball=$(mktemp --suffix=.tar)
  # shellcheck disable=SC2064
  trap "rm -f '$tarball'" EXIT
  mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
    --aptopt='Acquire::Retries "3"' --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    "$SUITE" "$tarball" "deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main" "deb $SECURITY $SUITE-security main"
  podman import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$tarball" "$BASE" >/dev/null
  rm -f "$tarball"
  say "base image: $(podman image inspect "$BASE" --format '{{.Size}}') bytes"
}

# The machine's pip configuration as a pip.conf, and the read-only mounts of what it names.
pip_mounts() {
  local conf=$1 key value token path
  declare -A seen=()
  : >"$conf.mounts"
  {
    echo "[global]"
    while IFS= read -r line; do
      key=${line%%=*}; value=${line#*=}; value=${value#\'}; value=${value%\'}
      key=${key##*.}
      [[ -n ${seen[$key]:-} ]] && continue   # pip lists the environment (which wins) first
      seen[$key]=1
      echo "$key = $value"
      for token in $value; do
        path=${token#file://}
        # a file:// index links to files beside its simple/ folder: its parent goes in whole
        [[ $token == file://* ]] && path=$(dirname "$path")
        [[ $path == /* && -e $path ]] && echo "$path" >>"$conf.mounts"
      done
    done < <(pip config list 2>/dev/null)
  } >"$conf"
  sort -u -o "$conf.mounts" "$conf.mounts"
}

build() {
  local targets=("$@") target
  ((${#targets[@]})) || targets=("${TARGETS[@]}")
  for target in "${targets[@]}"; do [[ -n ${IMAGE[$target]:-} ]] || die "unknown target $target (${TARGETS[*]})"; done
  if docker_engine; then
    for target in "${targets[@]}"; do docker build --target "$target" -t "${IMAGE[$target]}" .; done
    return
  fi
  command -v podman >/dev/null || die "podman is not installed: run scripts/images.sh setup"
  podman_env
  podman image exists "$BASE" || die "no base image $BASE: run scripts/images.sh setup"
  local conf volumes=() path log
  conf=$(mktemp -d)/pip.conf
  # shellcheck disable=SC2064
  trap "rm -rf '$(dirname "$conf")'" EXIT   # the machine's pip configuration never outlives the build
  log=${IMAGES_LOG:-$(mktemp --suffix=-images.log)}
  pip_mounts "$conf"
  volumes+=(--volume "$conf:/etc/pip.conf:ro")
  while IFS= read -r path; do volumes+=(--volume "$path:$path:ro"); done <"$conf.mounts"
  for target in "${targets[@]}"; do
    local started=$SECONDS
    say "building $target as ${IMAGE[$target]}"
    if ! podman build --network host --format docker --layers "${volumes[@]}" \
        --target "$target" -t "${IMAGE[$target]}" . >"$log" 2>&1; then
      tail -n 40 "$log" >&2
      die "building $target failed (the whole log: $log)"
    fi
    say "$target: $(( SECONDS - started )) s, $(podman image inspect "${IMAGE[$target]}" --format '{{.Size}}') bytes"
  done
}

case "${1:-}" in
  setup) setup ;;
  build) shift; build "$@" ;;
  tags) for target in "${TARGETS[@]}"; do echo "$target=${IMAGE[$target]}"; done ;;
  engine) if docker_engine; then echo docker; elif command -v podman >/dev/null; then echo podman; else exit 1; fi ;;
  *) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
