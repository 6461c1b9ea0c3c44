#!/usr/bin/env bash
# Fetch the public routing kernels that bench/bench_routing.py times in its "public" columns
# (issue 20 item 8) into an ignored folder, checksums pinned. Nothing is installed and nothing is
# copied into the project: the benchmark opens these archives at run time, extracts the one
# pure-Triton module it needs into a temporary directory and imports it from there.
#
#   bash scripts/fetch_public_kernels.sh [DIR]     # default DIR: <repo>/.bench_public (git-ignored)
#
# The GPU machine has no network: run this on a machine that has one, then carry the folder
# (the device tool's `carry: [".bench_public"]`), or point MOE_EXT_BENCH_PUBLIC at a copy.
#   (pip prepares an sdist's metadata even to download it; --no-build-isolation lets it use the torch
#   and setuptools already installed instead of building its build dependencies from source.)
#   megablocks 0.10.0 (sdist, Apache-2.0): megablocks/backend/kernels.py (imports torch, triton only)
#   transformer_engine 2.20.2 (the pure-Python wheel, Apache-2.0): transformer_engine/common/triton/
#     permutation.py (triton, packaging) + transformer_engine/pytorch/triton/permutation.py (torch,
#     triton and the former, whose package import the benchmark satisfies at load time)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.bench_public}
mkdir -p "$dir"
fetch() {  # fetch FILE SHA256 PIP-ARGS...
  local file=$1 sum=$2; shift 2
  if [ ! -f "$dir/$file" ]; then
    python3 -m pip download --no-deps -d "$dir" "$@"
  fi
  echo "$sum  $dir/$file" | sha256sum -c -
}
fetch megablocks-0.10.0.tar.gz 956fd9880fa869f7468da125da230733d5f84e10a9f8c2991e5e16523c6fe1e0 \
  --no-binary megablocks --no-build-isolation megablocks==0.10.0
fetch transformer_engine-2.20.2-py3-none-any.whl 7dcfad943a1a55b2612db9a0e43697fe98c70f4c42ec391ba3a0f872f6ce2094 \
  --only-binary :all: transformer_engine==2.20.2
ls -l "$dir"
