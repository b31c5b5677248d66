#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian machine with Python 3.11+:
# MMseqs2 (GraphPart's aligner, from Debian) and the package with a CPU build of PyTorch.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v mmseqs >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmseqs2 >/dev/null
    else
        echo "setup: install MMseqs2 (Debian/Ubuntu: apt-get install mmseqs2) for homology-partitioned folds" >&2
    fi
fi
# torch first and pinned: that version is a local CPU build; an unpinned torch pulls CUDA libraries.
pip install -q torch==2.13.0
pip install -q -e ".[test]"
