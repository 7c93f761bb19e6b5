#!/bin/bash
# The GPU check: `appliance doctor --save`, `appliance bench train --shape llama-3.2-1b --rounds 2 --save`
# (ours, TRL's SFTTrainer and the plain loop) and `appliance bench memory --shape llama-3.2-1b --save`,
# each bounded, on a GPU machine prepared by scripts/device/prepare.sh: bash .devrun/gpu_check.sh
# The results land in bench/results/*-gpu-*.json and, where $OUT is set, beside the log in $OUT.
OUT=${OUT:-$PWD/.devrun/out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu-check.log") 2>&1
set -u
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 9
export PYTHONPATH=/tmp/site:$PWD/.devrun/site:$PWD PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1
export APPLIANCE_HOME=/tmp/ah APPLIANCE_PEER_LOOP=$PWD/.devrun/peer_qlora_loop.py
rm -f bench/results/*-gpu-*.json
stage() { local name=$1 limit=$2; shift 2; echo "=== $name (limit ${limit}s) at +$(( $(date +%s) - T0 ))s"; timeout -k 5 "$limit" "$@"; echo "=== $name rc=$? at +$(( $(date +%s) - T0 ))s"; }
stage doctor 90 python3 -m appliance doctor --save
stage bench-train 190 python3 -m appliance bench train --shape llama-3.2-1b --steps 12 --rounds 2 --save
mkdir -p $APPLIANCE_HOME/bench-cache/memory
[ -d $APPLIANCE_HOME/bench-cache/llama-3.2-1b ] && ln -sfn ../llama-3.2-1b $APPLIANCE_HOME/bench-cache/memory/llama-3.2-1b
stage bench-memory 70 python3 -m appliance bench memory --shape llama-3.2-1b --seq-len 2048 --save
for f in $(git ls-files --others --exclude-standard bench/results | grep -- -gpu-); do cp "$f" "$OUT/"; done
ls $OUT
