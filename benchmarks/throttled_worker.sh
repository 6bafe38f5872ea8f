#!/bin/bash
# A worker as slow as a loaded host, without loading the host: `epdserve up` from TREE on PORT,
# and once it serves, its worker process moved into a cgroup-v1 CPU quota (QUOTA_PCT % of one
# core), then vLLM's client (64 prompts, 128 in / 64 out, concurrency 16). Run two at once
# (an old tree and a new one, two ports, two cgroups) for a side-by-side A/B of slow-worker
# handling (RESULTS.md, "503 no_workers under load"). Needs root and /sys/fs/cgroup/cpu.
# Usage: benchmarks/throttled_worker.sh TREE PORT OUT_DIR CGROUP_NAME QUOTA_PCT MODEL_DIR
set -u
TREE=$1; PORT=$2; OUT=$3; CG=/sys/fs/cgroup/cpu/$4; PCT=$5; M=$6
VLLM_VENV=${VLLM_VENV:-/work/vllm-venv}
mkdir -p "$CG" && echo 100000 > "$CG/cpu.cfs_period_us" && echo $((PCT * 1000)) > "$CG/cpu.cfs_quota_us"
cd "$TREE" || exit 1
export EPDSERVE_CONFIG_DIR=$OUT/cfg; rm -rf "$OUT"; mkdir -p "$OUT"
.venv/bin/python -m services.cli.main up --model "$M" --served-model-name bench-model --port "$PORT" \
  --verbose > "$OUT/up.log" 2>&1 &
UP=$!
for i in $(seq 300); do curl -s -m 2 "127.0.0.1:$PORT/v1/models" | grep -q bench-model && break; sleep 1; done
for p in $(pgrep -f services.worker -P $UP); do echo "$p" > "$CG/cgroup.procs"; done
echo "ready after $i s, load $(cut -d' ' -f1 /proc/loadavg); worker pids in $CG: $(tr '\n' ' ' < "$CG/cgroup.procs")"
VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=1 "$VLLM_VENV/bin/python" -c "import importlib.metadata as m, runpy, sys; v = m.version; m.version = lambda n: v('vllm-cpu') + '+cpu' if n == 'vllm' else v(n); sys.argv[0] = 'vllm'; runpy.run_module('vllm.entrypoints.cli.main', run_name='__main__', alter_sys=True)" \
  bench serve --backend openai --base-url "http://127.0.0.1:$PORT" --endpoint /v1/completions \
  --model bench-model --tokenizer "$M" --dataset-name random --random-input-len 128 \
  --random-output-len 64 --ignore-eos --num-prompts 64 --max-concurrency 16 --request-rate inf \
  --seed 0 --save-result --save-detailed --result-dir "$OUT" --result-filename bench.json > "$OUT/bench.log" 2>&1
grep -E "Successful|Failed requests:|Median TTFT|Median TPOT|P99 ITL" "$OUT/bench.log"
echo "stopped answering: $(grep -c 'stopped answering' "$OUT/up.log"), load $(cut -d' ' -f1 /proc/loadavg)"
kill -INT $UP; sleep 5; kill -9 $UP 2>/dev/null; rmdir "$CG" 2>/dev/null
