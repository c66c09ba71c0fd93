#!/usr/bin/env bash
# Builds a minimal Debian bookworm image with debootstrap and `docker import`, for machines
# that reach no container registry (air-gapped hosts, this project's CI). The Dockerfile
# then builds on it with --build-arg BASE_IMAGE=filesrv-base:bookworm.
#
#   rig/build-base-image.sh [TAG]        (default tag: filesrv-base:bookworm)
#
# Needs root, debootstrap and a Debian mirror (read from /etc/apt/sources.list.d/debian.sources
# or $DEBIAN_MIRROR). Extra CA certificates trusted by this host
# (/usr/local/share/ca-certificates/*.crt) are trusted inside the image too, so that pip
# works behind a TLS-intercepting proxy. Skips the build when the tag already exists.
set -euo pipefail
tag=${1:-filesrv-base:bookworm}
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "base image $tag exists"
  exit 0
fi
mirror=${DEBIAN_MIRROR:-$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)}
mirror=${mirror:-http://deb.debian.org/debian}
rootfs=$(mktemp -d /tmp/filesrv-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
echo "debootstrap bookworm from $mirror"
debootstrap --variant=minbase \
  --include=python3,python3-venv,iproute2,iptables,ca-certificates,xxhash,procps \
  bookworm "$rootfs" "$mirror" >/tmp/filesrv-debootstrap.log 2>&1 \
  || { tail -20 /tmp/filesrv-debootstrap.log; exit 1; }
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
  chroot "$rootfs" update-ca-certificates >/dev/null
fi
printf 'deb %s bookworm main\n' "$mirror" > "$rootfs/etc/apt/sources.list"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar --numeric-owner -C "$rootfs" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' - "$tag" >/dev/null
echo "built $tag"
