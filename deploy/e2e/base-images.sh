#!/usr/bin/env bash
# Makes the base images the compose end-to-end test needs, without any image registry:
#
#   proclog-e2e/debian:bookworm   a minimal Debian (debootstrap, ca-certificates) standing in
#                                 for debian:bookworm-slim as the Dockerfile's RUNTIME_IMAGE
#   proclog-e2e/postgres:15       PostgreSQL 15 with an entrypoint that honours the official
#                                 image's POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB and
#                                 /docker-entrypoint-initdb.d (deploy/e2e/postgres/)
#
# Packages come from the Debian mirror this machine's apt configuration names (read at run
# time). Images that exist already are kept, so a second run costs nothing; E2E_REBUILD=1
# makes them again. Needs root (debootstrap, chroot) and a Docker engine.
set -euo pipefail
cd "$(dirname "$0")/../.."

debian_image=${E2E_DEBIAN_IMAGE:-proclog-e2e/debian:bookworm}
postgres_image=${E2E_POSTGRES_IMAGE:-proclog-e2e/postgres:15}
suite=${SUITE:-bookworm}   # the images' release (the base of the runtime image)

have_image() { [ -z "${E2E_REBUILD:-}" ] && docker image inspect "$1" >/dev/null 2>&1; }
if have_image "$debian_image" && have_image "$postgres_image"; then
    echo "base images cached: $debian_image $postgres_image"
    exit 0
fi

# The Debian mirror this machine's apt already uses: an entry for this machine's release
# (suite = codename) with the `main` component, deb822 `.sources` or one-line format (options
# in brackets skipped). MIRROR=<url> overrides it.
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
mirror_from_apt() {
    local file
    for file in /etc/apt/sources.list.d/*.sources; do
        [ -f "$file" ] || continue
        awk -v suite="$codename" '
            function flush() { if (uri != "" && has_suite && has_main && !found) found = uri }
            /^URIs:/       { uri = $2 }
            /^Suites:/     { for (i = 2; i <= NF; i++) if ($i == suite) has_suite = 1 }
            /^Components:/ { for (i = 2; i <= NF; i++) if ($i == "main") has_main = 1 }
            /^[ \t]*$/     { flush(); uri = ""; has_suite = 0; has_main = 0 }
            END            { flush(); if (found) print found }' "$file"
    done
    for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$file" ] || continue
        awk -v suite="$codename" '
            $1 == "deb" {
                n = 2
                if ($n ~ /^\[/) { while (n <= NF && $n !~ /\]$/) n++; n++ }
                if ($(n + 1) == suite) for (i = n + 2; i <= NF; i++) if ($i == "main") { print $n; exit }
            }' "$file"
    done
}
# `sed -n 1p` reads all of its input (`head` would close the pipe early and, under pipefail,
# end the script with SIGPIPE).
mirror=${MIRROR:-$(mirror_from_apt | sed -n 1p)}
if [ -z "$mirror" ]; then
    echo "no Debian mirror for '$codename' with component main found in the apt configuration; set MIRROR=<url>" >&2
    exit 1
fi
command -v debootstrap >/dev/null || {
    echo "debootstrap is not installed (apt-get install debootstrap)" >&2
    exit 1
}

work=$(mktemp -d /tmp/proclog-e2e-rootfs.XXXXXX)
cleanup() {
    for mount in "$work"/rootfs/proc; do
        mountpoint -q "$mount" 2>/dev/null && umount "$mount"
    done
    rm -rf "$work"
}
trap cleanup EXIT
rootfs=$work/rootfs

echo "debootstrap $suite (minbase + ca-certificates) ..."
debootstrap --variant=minbase --include=ca-certificates "$suite" "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || {
    tail -n 30 "$work/debootstrap.log" >&2
    exit 1
}
# Slim it the way the official -slim images are: no docs, man pages, locales or apt lists.
slim() {
    rm -rf "$1"/usr/share/doc/* "$1"/usr/share/man/* "$1"/usr/share/info/* \
        "$1"/usr/share/locale/* "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin \
        "$1"/var/cache/apt/archives/*.deb "$1"/var/log/*.log
}
import() {
    local dir=$1 image=$2
    shift 2
    docker image rm -f "$image" >/dev/null 2>&1 || true   # no dangling predecessor
    tar -C "$dir" -c . | docker import "$@" - "$image" >/dev/null
    echo "made $image ($(docker image inspect -f '{{.Size}}' "$image" | awk '{ printf "%.0f MB", $1 / 1e6 }'))"
}
slim "$rootfs"
import "$rootfs" "$debian_image" \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]'

echo "installing PostgreSQL 15 into a copy ..."
printf '#!/bin/sh\nexit 101\n' > "$rootfs/usr/sbin/policy-rc.d"
chmod +x "$rootfs/usr/sbin/policy-rc.d"
mkdir -p "$rootfs/etc/postgresql-common"
echo "create_main_cluster = false" > "$rootfs/etc/postgresql-common/createcluster.conf"
mount -t proc proc "$rootfs/proc"
chroot "$rootfs" /bin/sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends postgresql-15 >/dev/null && apt-get clean'
umount "$rootfs/proc"
rm -f "$rootfs/usr/sbin/policy-rc.d"
slim "$rootfs"
import "$rootfs" "$postgres_image-base" \
    --change 'ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
docker image rm -f "$postgres_image" >/dev/null 2>&1 || true
docker build -q -t "$postgres_image" --build-arg BASE="$postgres_image-base" deploy/e2e/postgres >/dev/null
docker image rm "$postgres_image-base" >/dev/null
echo "made $postgres_image"
