#!/bin/bash
# Labeller cost on a warm scan: the full HH file, activations/SAE/codes cached; first labelling (empty label
# cache), cached labels, and no labeller, back to back. Usage: bench_labelcost.sh <code dir> <cache dir> [data]
SRC=$1; C=$2
cd $SRC
export PYTHONPATH=$PWD:$PWD/plugins/safer-audit-llm:$PWD/plugins/safer-audit-jsonl HF_HUB_OFFLINE=1
D=${3:-../shared/data/hh-rlhf-harmless-base-test.jsonl.gz}
PY=${PYTHON:-python}
echo "== start $(date -Is) uptime: $(uptime)"
$PY -c 'import sys; from safer_audit.cli import main; main(sys.argv[1:])' scan $D -q --cache-dir $C -o ${TMPDIR:-/tmp}/labelcost-warmup.json > /dev/null 2>&1
for rep in 1 2; do
for run in first cached none; do
  lab=offline; [ $run = none ] && lab=none
  [ $run = first ] && find $C -name labels -type d -prune -exec rm -rf {} +
  s=$(date +%s.%N)
  $PY -c 'import sys; from safer_audit.cli import main; main(sys.argv[1:])' scan $D -q --cache-dir $C --labeller $lab -o ${TMPDIR:-/tmp}/labelcost-$run.json > /dev/null 2>&1
  rc=$?; e=$(date +%s.%N)
  echo "$rep $run rc=$rc wall=$(python3 -c "print(round($e-$s,2))") $(python3 -c "import json; t=json.load(open('${TMPDIR:-/tmp}/labelcost-$run.json'))['run']['timings']; print({k: round(v,2) for k,v in t.items()}, 'sum', round(sum(t.values()),2))")"
done; done
echo "== end $(date -Is) uptime: $(uptime)"
