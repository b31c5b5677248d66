#!/usr/bin/env bash
# The main job, end to end: embed a FASTA with ESM-2 8M into a cache, then describe the cache.
#   bash scripts/demo.sh [FASTA] [OUT.h5]
# Without network or cached weights ESM-2 cannot be had; the demo then says so and runs the same
# pipeline with a RANDOM-WEIGHT model of the 8M shape, whose embeddings mean nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
# The environment scripts/setup.sh made, unless another one is active.
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
    # shellcheck disable=SC1091
    source .venv/bin/activate
fi
fasta=${1:-../shared/data/deeplocpro/graphpart_subset.fasta}
out=${2:-demo/deeplocpro_subset_esm2_t6_8M.h5}
mkdir -p demo "$(dirname "$out")"
if why=$(embedcache fetch esm2_t6_8M_UR50D 2>&1); then
    embedcache extract "$fasta" "$out" --model esm2_t6_8M_UR50D
else
    echo "demo: the ESM-2 8M weights are not in the torch hub cache and cannot be downloaded here;" >&2
    echo "demo: running the same pipeline with a RANDOM-WEIGHT model of the 8M shape (speed demo only)" >&2
    echo "demo: (embedcache fetch said: ${why#Error: })" >&2
    out=${out%.h5}_RANDOM_WEIGHTS.h5
    embedcache tiny-model demo/random_esm2_8M_shape.pt --layers 6 --dim 320 --heads 20
    embedcache extract "$fasta" "$out" --weights demo/random_esm2_8M_shape.pt
fi
embedcache info "$out"
