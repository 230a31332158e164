#!/usr/bin/env bash
# make demo: the stack, two mock endpoints and a worker, then `llm-streams batch` on the
# shipped example file; then a pipeline worker (support-ticket triage) on its example events. Stops the mocks and the worker it started; leaves the stack up
# (`make stack-down` stops it).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bin=$root/.venv/bin
out=$root/out
mkdir -p "$out"
scripts/stack.sh up
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
"$bin/llm-streams" mock-llm --port 8001 --latency-ms 50 --jitter-ms 20 >"$out/mock-a.log" 2>&1 & pids+=($!)
"$bin/llm-streams" mock-llm --port 8002 --latency-ms 80 --jitter-ms 20 >"$out/mock-b.log" 2>&1 & pids+=($!)
LLM_STREAMS__KAFKA__GROUP_ID=llm-streams-demo \
  "$bin/llm-streams" worker --config config/default.yaml >"$out/worker.log" 2>&1 & pids+=($!)
echo "worker and mocks started (logs in out/); running the batch job"
set +e
LLM_STREAMS__KAFKA__GROUP_ID=llm-streams-demo \
  "$bin/llm-streams" batch examples/requests.jsonl --save "$out/responses.jsonl" \
  --errors "$out/errors.jsonl" --config config/default.yaml --timeout 180
rc=$?
set -e
echo
echo "first response:"; head -n 1 "$out/responses.jsonl" || true
echo "first dead letter:"; head -n 1 "$out/errors.jsonl" || true
if [ "$rc" = 1 ]; then
  echo "(exit 1 is expected: examples/requests.jsonl has two invalid lines on purpose)"
  rc=0
fi
[ "$rc" = 0 ] || exit "$rc"

echo
echo "a pipeline: support tickets in, triaged tickets out (config/pipelines/support-triage.yaml)"
LLM_STREAMS__KAFKA__GROUP_ID=llm-streams-demo \
  "$bin/llm-streams" worker --config config/pipelines/support-triage.yaml \
  --pipeline support-triage >"$out/pipeline-worker.log" 2>&1 & pids+=($!)
"$bin/python" scripts/pipeline_demo.py config/pipelines/support-triage.yaml support-triage \
  examples/support-tickets.jsonl --timeout 180
echo "(the last ticket has no subject on purpose: a template dead letter naming the field)"
