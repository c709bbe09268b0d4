#!/usr/bin/env bash
# `make demo`: start a local farm, render a batch of prompts, download the PNGs to ./out, stop.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
STATE=.sdfarm/demo
rm -rf "$STATE" && mkdir -p "$STATE"
started=$(date +%s)

"$BIN/sdfarm" up --workers 2 --storage s3 --state-dir "$STATE" >"$STATE/up.log" 2>&1 &
farm=$!
trap 'kill -INT $farm 2>/dev/null; wait $farm 2>/dev/null || true' EXIT

# `sdfarm up` writes the environment to use once the API answers.
for _ in $(seq 1 600); do
  [ -f "$STATE/env" ] && break
  kill -0 $farm 2>/dev/null || { cat "$STATE/up.log"; echo "the farm did not start" >&2; exit 1; }
  sleep 0.2
done
[ -f "$STATE/env" ] || { cat "$STATE/up.log"; echo "the farm did not start in time" >&2; exit 1; }
# shellcheck disable=SC1091
source "$STATE/env"
cat "$STATE/up.log"

batch=$("$BIN/sdfarm" submit scripts/demo-prompts.txt --width 128 --height 128 --steps 20)
"$BIN/sdfarm" wait "$batch"
"$BIN/sdfarm" fetch "$batch" --out out
ls -l out
echo "demo finished in $(( $(date +%s) - started )) s: $(ls out/*.png | wc -l) images in ./out"
