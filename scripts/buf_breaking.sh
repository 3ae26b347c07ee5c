#!/usr/bin/env bash
# `buf breaking` against the contract as main had it before this change. A fresh clone may be
# shallow or have no earlier contract; then there is nothing to compare against and we say so.
set -euo pipefail
BUF=${1:-buf}
root=$(git rev-parse --show-toplevel)
base=$(git rev-parse --verify -q HEAD~1 || true)
if [[ -z "$base" ]] || ! git cat-file -e "$base:proto/buf.yaml" 2>/dev/null; then
  echo "buf breaking: no earlier contract on main to compare against"
  exit 0
fi
cd "$root/proto"
"$root/$BUF" breaking --against "$root/.git#ref=$base,subdir=proto"
