#!/usr/bin/env bash
# One command: bench/run.sh [bench/run.py options]
# Installs what the benchmark needs (Debian: wrk nginx-light redis-server;
# the project venv + bench/requirements.txt), then runs bench/run.py, which
# writes docs/benchmarks.md and keeps raw outputs in bench/results/<stamp>/.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
missing=0
for t in wrk nginx redis-server redis-cli taskset; do
  command -v "$t" >/dev/null 2>&1 || [ -x "/usr/sbin/$t" ] || missing=1
done
if [ "$missing" = 1 ]; then
  echo "bench: installing wrk nginx-light redis-server from Debian packages" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq wrk nginx-light redis-server >/dev/null
fi

# The project's own bootstrap creates/updates .venv with relayd installed.
source "$ROOT/scripts/bootstrap"
stamp=.venv/.bench-$(sha1sum bench/requirements.txt | cut -c1-12)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -r bench/requirements.txt
  rm -f .venv/.bench-*
  touch "$stamp"
fi
exec "$ROOT/.venv/bin/python" "$ROOT/bench/run.py" --invocation "bench/run.sh${*:+ $*}" "$@"
