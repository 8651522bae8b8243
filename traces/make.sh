#!/usr/bin/env bash
# Regenerate the shipped traces where valgrind exists: lackey's memory trace of small real
# programs, gzipped (mmu run trace reads .gz as is).
set -euo pipefail
cd "$(dirname "$0")"
for prog in /bin/true; do
    name=$(basename "$prog")
    valgrind --tool=lackey --trace-mem=yes --log-file="$name.lackey" "$prog"
    gzip -9 -f "$name.lackey"
done
