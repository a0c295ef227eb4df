#!/usr/bin/env bash
# Make a Debian bookworm base image with Python from Debian's mirror and import it into
# podman, for building the data image where no registry can be pulled from (CI).
# Usage: images/local-base.sh IMAGE_NAME   (run as root: debootstrap needs it)
set -euo pipefail
name=${1:?usage: $0 IMAGE_NAME}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
root=$(mktemp -d /var/tmp/embedpipe-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" "$mirror" >"$root.log" 2>&1 || { tail -20 "$root.log"; exit 1; }
rm -f "$root.log"
# what a registry base image would not carry: package caches and lists
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/*
tar -C "$root" -c . | podman import --change 'CMD ["/bin/bash"]' - "$name" >/dev/null
echo "imported $name"
