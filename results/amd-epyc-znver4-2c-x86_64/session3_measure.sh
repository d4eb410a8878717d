#!/usr/bin/env bash
# The measurements of this machine's third session (2026-12-01), alone on the host, in this order:
#   1. tune qwen3-30b-a3b in fp32 and bf16 into the default kernel DB (the demo's fp32 records went stale with
#      this session's Triton edits, before records were made per backend)
#   2. the full-size qwen3-30b-a3b layer, fp32 and bf16, T = 1, 16, 256, 1024: reference, HF, ggml, tuned
#   3. the whole-model bench: a 4-layer Qwen3-MoE causal LM, HF vs patched
# Logs and rows land beside this script.
set -uo pipefail
cd "$(dirname "$0")/../.."
here=results/amd-epyc-znver4-2c-x86_64
M=.venv/bin/moetune
lscpu | grep -E "Model name|Flags" | cut -c1-200 > "$here/session3_lscpu.txt"
$M tune --model qwen3-30b-a3b --dtype float32 --m 1,16,256 --trials 24 --time-budget 6m 2>&1 | tee "$here/session3_tune_fp32.log"
$M tune --model qwen3-30b-a3b --dtype bfloat16 --m 1,16,256 --trials 24 --time-budget 6m 2>&1 | tee "$here/session3_tune_bf16.log"
$M bench -p qwen3-30b-a3b --tokens 1,16,256,1024 --dtype float32,bfloat16 \
    --providers reference,hf-eager,hf-grouped_mm,ggml,tuned --out "$here/layer_bench_v2.csv" \
    --report "$here/bench_report_qwen3_session3.json" --plot "$here/bench_plots_session3" 2>&1 | tee "$here/session3_bench.log"
$M bench --e2e -p qwen3-30b-a3b --layers 4 --tokens 256 --repeat 3 --out "$here/e2e.csv" 2>&1 | tee "$here/session3_e2e.log"
