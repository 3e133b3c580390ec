#!/bin/bash
# A/B of two or more checkouts (e.g. `git archive` snapshots) in one job: bench_scan.py (bare forward, cold and
# warm scan) on each, then bench_labelcost.sh (first/cached/no labelling) on each one's warm cache.
# Usage: [PYTHON=python] [DATA=file] flock /tmp/bench.lock benchmarks/ab_scan.sh CHECKOUT...
HERE=$(cd "$(dirname "$0")" && pwd)
D=${DATA:-$HERE/../../shared/data/hh-rlhf-harmless-base-test.jsonl.gz}
PY=${PYTHON:-python}
for snap in "$@"; do
  name=$(basename "$snap"); rm -rf "/tmp/ab-scan-$name-cache"
  echo "== bench_scan $name start $(date -Is) $(uptime)"
  (cd "$snap" && PYTHONPATH=$snap:$snap/plugins/safer-audit-llm:$snap/plugins/safer-audit-jsonl HF_HUB_OFFLINE=1 \
     $PY benchmarks/bench_scan.py --data "$D" --cache-dir "/tmp/ab-scan-$name-cache" 2>&1 | grep -v "^\s*$" | tail -12)
  echo "== end $(date -Is) $(uptime)"
done
for snap in "$@"; do
  name=$(basename "$snap")
  echo "== labelcost $name"
  PYTHON=$PY TMPDIR=/tmp bash "$HERE/bench_labelcost.sh" "$snap" "/tmp/ab-scan-$name-cache" "$D"
done
