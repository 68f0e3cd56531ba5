#!/usr/bin/env bash
# Installs the Debian packages tandem needs (etcd server, LVM, NBD tools, fio, filesystems,
# nftables). Skips apt entirely when every tool is already present.
set -euo pipefail
need=(etcd:etcd-server lvcreate:lvm2 nbdfuse:libnbd-bin nbdinfo:libnbd-bin nbdcopy:libnbd-bin
      qemu-io:qemu-utils qemu-nbd:qemu-utils fio:fio nft:nftables mkfs.xfs:xfsprogs
      mkfs.ext4:e2fsprogs fusermount3:fuse3 ip:iproute2 losetup:mount nsenter:util-linux
      blkid:util-linux)
missing=()
for pair in "${need[@]}"; do
  tool=${pair%%:*}; pkg=${pair##*:}
  command -v "$tool" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
pkgs=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
echo "installing Debian packages: $pkgs"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
