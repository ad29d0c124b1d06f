#!/usr/bin/env bash
# Builds the `proclog:local` container image without any image registry: a minimal Debian
# root filesystem from debootstrap (using this machine's configured Debian mirror), with the
# PostgreSQL server and the release build of proclog added, imported with `docker import`.
#
#   deploy/build-image.sh            # then: docker-compose up -d
#
# Environment: PROCLOG_IMAGE (default proclog:local), SUITE (default: this machine's codename).
set -euo pipefail
cd "$(dirname "$0")/.."

image=${PROCLOG_IMAGE:-proclog:local}
suite=${SUITE:-$(. /etc/os-release && echo "$VERSION_CODENAME")}

# The Debian mirror this machine's apt already uses (deb822 .sources or one-line format).
mirror_from_apt() {
    local file
    for file in /etc/apt/sources.list.d/*.sources; do
        [ -f "$file" ] || continue
        awk -v suite="$suite" '
            /^URIs:/   { uri = $2 }
            /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) found = uri }
            /^$/       { uri = "" }
            END        { if (found) print found }' "$file"
    done | head -n 1
    if [ -f /etc/apt/sources.list ]; then
        awk -v suite="$suite" '$1 == "deb" && $3 == suite { print $2; exit }' /etc/apt/sources.list
    fi
}
mirror=$(mirror_from_apt | head -n 1)
if [ -z "$mirror" ]; then
    echo "no Debian mirror for $suite found in the apt configuration" >&2
    exit 1
fi

if ! command -v debootstrap >/dev/null; then
    apt-get update -qq && apt-get install -y -qq debootstrap
fi

cargo build --release --locked

rootfs=$(mktemp -d /tmp/proclog-rootfs.XXXXXX)
cleanup() { rm -rf "$rootfs"; }
trap cleanup EXIT

echo "debootstrap $suite into $rootfs ..."
debootstrap --variant=minbase "$suite" "$rootfs" "$mirror" >/dev/null

# Install the PostgreSQL server inside without starting anything or creating a cluster.
printf '#!/bin/sh\nexit 101\n' > "$rootfs/usr/sbin/policy-rc.d"
chmod +x "$rootfs/usr/sbin/policy-rc.d"
mkdir -p "$rootfs/etc/postgresql-common"
echo "create_main_cluster = false" > "$rootfs/etc/postgresql-common/createcluster.conf"
chroot "$rootfs" /bin/sh -c \
    'DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null && apt-get clean'
rm -rf "$rootfs"/var/lib/apt/lists/*

install -m 0755 target/release/proclog "$rootfs/usr/local/bin/proclog"
install -m 0755 deploy/db-entrypoint.sh "$rootfs/usr/local/bin/proclog-db"

tar -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin' \
    --change 'CMD ["proclog", "--help"]' \
    - "$image" >/dev/null
echo "built $image"
