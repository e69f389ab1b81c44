#!/usr/bin/env bash
# Upload bench: the project's server beside raw socat, nginx, aiohttp and stock twisted.web,
# first with curl -T (upload_bench.py), then chunked and multipart bodies (upload_variants.py),
# then the project's tus uploads against its own curl -T (tus_bench.py).
# `make bench` installs what this needs and calls it; see docs/performance.md.
#
# Environment (all optional):
#   SIZE_MIB  upload size, default 1024          ROUNDS   timed rounds, default 5
#   TARGETS   default raw,nginx,aiohttp,twisted-naive,project
#   VARIANTS  default chunked,multipart ("" skips upload_variants.py)
#   VARIANT_TARGETS  targets for the variants, default nginx,aiohttp,twisted-naive,project
#   TUS_CHUNK_MIB  tus PATCH size for tus_bench.py (the project against itself with curl -T),
#             default 64 ("" skips it; so does a TARGETS without project)
#   PEER_PY   python with twisted and aiohttp, default bench/.venv/bin/python
#   PROJECT_CMD  how to start the project on 127.0.0.1:18090 storing under $STORE
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

SIZE_MIB=${SIZE_MIB:-1024}
ROUNDS=${ROUNDS:-5}
TARGETS=${TARGETS:-raw,nginx,aiohttp,twisted-naive,project}
VARIANTS=${VARIANTS-chunked,multipart}
VARIANT_TARGETS=${VARIANT_TARGETS:-nginx,aiohttp,twisted-naive,project}
TUS_CHUNK_MIB=${TUS_CHUNK_MIB-64}
export PEER_PY=${PEER_PY:-$root/bench/.venv/bin/python}
# $STORE is expanded by upload_bench.py's shell, which sets it per target.
export PROJECT_CMD=${PROJECT_CMD:-"$root/.venv/bin/transcoder serve --listen tcp:18090:interface=127.0.0.1 --data-dir \"\$STORE\" --max-upload-size 4G"}

# Until the project has its server, bench the peers alone rather than fail.
drop_project() {
  local list=$1 out=() t
  IFS=, read -ra all <<<"$list"
  for t in "${all[@]}"; do [[ $t == project ]] || out+=("$t"); done
  (IFS=,; echo "${out[*]}")
}
if [[ ,$TARGETS,$VARIANT_TARGETS, == *,project,* ]] \
   && ! "$root/.venv/bin/transcoder" serve --help >/dev/null 2>&1; then
  echo "note: '.venv/bin/transcoder serve' is not available yet: the project target is left out" >&2
  TARGETS=$(drop_project "$TARGETS")
  VARIANT_TARGETS=$(drop_project "$VARIANT_TARGETS")
fi

# Two benches at once would share these ports, and each would measure the other's servers.
exec 9>"${TMPDIR:-/tmp}/transcoder-upload-bench.lock"
if ! flock -n 9; then
  echo "another upload bench is running here: waiting for it" >&2
  flock 9
fi
"$PEER_PY" - <<'EOF'
import sys
ports = {18081, 18082, 18083, 18084, 18085, 18090}
busy = set()
for tab in ("/proc/net/tcp", "/proc/net/tcp6"):
    for line in open(tab).readlines()[1:]:
        f = line.split()
        if f[3] == "0A":  # LISTEN
            busy.add(int(f[1].rsplit(":", 1)[1], 16))
if busy & ports:
    sys.exit(f"port(s) {sorted(busy & ports)} already in use (another bench or server?): stop it")
EOF

echo "== curl -T: bench/upload_bench.py $SIZE_MIB $ROUNDS $TARGETS"
"$PEER_PY" bench/upload_bench.py "$SIZE_MIB" "$ROUNDS" "$TARGETS"

if [[ -n $VARIANTS && -n $VARIANT_TARGETS ]]; then
  echo
  echo "== chunked and multipart: bench/upload_variants.py $SIZE_MIB $ROUNDS $VARIANT_TARGETS $VARIANTS"
  "$PEER_PY" bench/upload_variants.py "$SIZE_MIB" "$ROUNDS" "$VARIANT_TARGETS" "$VARIANTS"
fi

if [[ -n $TUS_CHUNK_MIB && ,$TARGETS, == *,project,* ]]; then
  echo
  echo "== tus: bench/tus_bench.py $SIZE_MIB $ROUNDS $TUS_CHUNK_MIB"
  "$PEER_PY" bench/tus_bench.py "$SIZE_MIB" "$ROUNDS" "$TUS_CHUNK_MIB"
fi
