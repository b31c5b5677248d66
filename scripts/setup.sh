#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian machine with Python 3.11+, into a
# virtual environment .venv/ in the checkout (Debian's python refuses `pip install` outside
# one, PEP 668): MMseqs2 (GraphPart's aligner, from Debian) and the package with a CPU build
# of PyTorch. Afterwards: `source .venv/bin/activate`, or call .venv/bin/embedcache directly.
set -euo pipefail
cd "$(dirname "$0")/.."
as_root() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; }
apt_updated=
apt_install() {
    [ -n "$apt_updated" ] || { apt-get update -qq; apt_updated=1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
if ! command -v mmseqs >/dev/null; then
    if as_root; then
        apt_install mmseqs2
    else
        echo "setup: install MMseqs2 (Debian/Ubuntu: apt-get install mmseqs2) for homology-partitioned folds" >&2
    fi
fi
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    if ! "$python" -m venv .venv 2>/dev/null; then
        # Debian ships venv's pip bootstrap separately.
        rm -rf .venv
        if as_root; then
            apt_install python3-venv
            "$python" -m venv .venv
        else
            echo "setup: '$python -m venv' failed; install python3-venv (Debian/Ubuntu) and run again" >&2
            exit 1
        fi
    fi
fi
pip=(.venv/bin/python -m pip)
# torch first and pinned: that version is a local CPU build here; an unpinned torch pulls the
# CUDA build with several GB of libraries. Elsewhere, choose the build first, e.g.
#   .venv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu     (CPU)
#   .venv/bin/pip install torch --index-url https://download.pytorch.org/whl/cu124   (CUDA 12.4)
# and then run this script: an installed torch >= 2.6 is kept.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    "${pip[@]}" install -q torch==2.13.0
fi
"${pip[@]}" install -q -e ".[test,cluster]"
