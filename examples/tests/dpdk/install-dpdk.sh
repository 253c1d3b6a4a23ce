#!/usr/bin/env bash
# Installs DPDK's testpmd with the virtio-user and vhost PMDs (Debian
# bookworm packages) if it is missing; prints the path of dpdk-testpmd.
set -euo pipefail
if ! command -v dpdk-testpmd >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends \
        dpdk-dev librte-net-vhost23 librte-net-virtio23 librte-mempool-ring23 >/dev/null
fi
command -v dpdk-testpmd
