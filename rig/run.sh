#!/usr/bin/env bash
# The whole docker-compose rig in one command, from a fresh clone, torn down at the end:
#   bash rig/run.sh
# Starts a Docker engine if none answers (installing docker.io, docker-compose and
# debootstrap with apt-get when they are missing), builds the offline base image when no
# registry is reachable (or uses $BASE_IMAGE), builds the images, runs the rig scenarios
# (tests/rig, pytest marker "rig"), and removes every container, network and volume.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)

if ! docker info >/dev/null 2>&1; then
  if ! command -v dockerd >/dev/null || ! command -v docker-compose >/dev/null \
     || ! command -v debootstrap >/dev/null; then
    echo "rig: installing docker.io docker-compose debootstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io docker-compose debootstrap >/dev/null
  fi
  echo "rig: starting dockerd (log: /tmp/filesrv-rig-dockerd.log)"
  (dockerd >/tmp/filesrv-rig-dockerd.log 2>&1 &)
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { tail -20 /tmp/filesrv-rig-dockerd.log; exit 1; }
fi

if [ -z "${BASE_IMAGE:-}" ]; then
  if docker image inspect python:3.12-slim >/dev/null 2>&1 \
     || timeout 60 docker pull -q python:3.12-slim >/dev/null 2>&1; then
    export BASE_IMAGE=python:3.12-slim
  else
    echo "rig: no registry reachable: building the base image with debootstrap"
    bash rig/build-base-image.sh filesrv-base:bookworm
    export BASE_IMAGE=filesrv-base:bookworm
  fi
fi
echo "rig: base image $BASE_IMAGE"

python3 -c "import pytest" 2>/dev/null || pip install -q -e '.[test]'
export RIG_PROJECT="filesrv-rig-$$"
compose() { if command -v docker-compose >/dev/null; then docker-compose "$@"; else docker compose "$@"; fi; }
trap 'compose -p "$RIG_PROJECT" --profile faults --profile replicas down -v --remove-orphans >/dev/null 2>&1 || true' EXIT

status=0
python3 -m pytest -m rig tests/rig -v -p no:cacheprovider || status=$?
echo "rig: finished in $(( $(date +%s) - started )) s"
exit $status
