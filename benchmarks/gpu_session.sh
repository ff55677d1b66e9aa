#!/usr/bin/env bash
# The one prepared call for a GPU session (issue 14), sized to fit one device call (<= 600 s) on
# a bare box with torch and a GPU: the project's light wheels are carried in .whl/ (git-ignored;
# `pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl
# timm==1.0.31 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-extensions typing-inspection` here).
#   run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)
# A second call, when the first left MFU short of 0.40 (max-autotune: CUDA graphs, and Inductor's
# GEMM templates tuned, with GELU and LayerNorm fused into their epilogues; minutes of compilation):
#   run(command="LIMIT=<timeout_s> bash benchmarks/gpu_session.sh autotune", carry=[".whl"], timeout_s=<what is left>)
# with ATTENTION=sdpa in front if the first call's flex rows failed or were slower. LIMIT (default
# 600) is the call's timeout_s: the parts end 30 s before it, so their files have time to come back.
# A first call with LIMIT below 600 leaves device time for the second: part 4 shrinks, then goes.
# Each part writes its own file under $OUT as it goes, so a part cut off by its timeout still
# returns what it printed.
set -u
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
END=$((${LIMIT:-600} - 30))
# Seconds for a part: what is left, at most $1, at least 1 (timeout 0 would mean no limit at all).
upto() { local left=$((END - SECONDS)); echo $((left < 1 ? 1 : left < $1 ? left : $1)); }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
if [ "${1:-}" = autotune ]; then
    # One variant only: its compilation takes most of a call.
    timeout "$(upto "$END")" python3 benchmarks/gpu_step.py --batch 64 --steps 60 --workers 12 \
        --compile max-autotune --pretrain-attention "${ATTENTION:-flex}" --data /tmp/jpegs > "$OUT/gpu_step_autotune.txt" 2>&1
    echo "rc $?" >> "$OUT/gpu_step_autotune.txt"
    tail -n 12 "$OUT/gpu_step_autotune.txt"
    exit 0
elif [ -n "${1:-}" ]; then
    echo "gpu_session.sh: unknown part '$1' (allowed: none for the first call, 'autotune' for the second)" >&2
    exit 2
fi
# In order of what issue 14 needs, each part with what is left of LIMIT less 30 s (570 s by default):
# 1. The candidate configuration, CUDA graphs (reduce-overhead) with FlexAttention for BEiT's biased
#    attention, then CUDA graphs with SDPA's attention, in one process: the step alone (MFU) and the
#    real loop (12 loader workers), ~2 min each (a minute of compilation for each).
timeout "$(upto 330)" python3 benchmarks/gpu_step.py --batch 64 --steps 60 --workers 12 --compile reduce-overhead \
    --pretrain-attention flex,sdpa --data /tmp/jpegs > "$OUT/gpu_step.txt" 2>&1
echo "rc $?" >> "$OUT/gpu_step.txt"
# 2. The paper-scale path with that configuration, collectives on (DDP): FlexAttention's gradients
#    against SDPA's, then pre-training, probes, fine-tuning.
TORCH_LOGS=cudagraphs timeout "$(upto 200)" python3 benchmarks/gpu_check.py --compile reduce-overhead \
    --set pretrain.attention=flex > "$OUT/gpu_check.txt" 2>&1
echo "rc $?" >> "$OUT/gpu_check.txt"
# 3. If more than 90 s are left: BEiT's attention alone, per kernel (memory-efficient SDPA, cuDNN, math,
#    explicit compiled, FlexAttention compiled), forward + backward with the bias's gradient, and each
#    one's gradients against the memory-efficient kernel's: why part 1's flex rows are faster or not.
if [ $((END - SECONDS)) -gt 90 ]; then
    timeout 60 python3 benchmarks/gpu_step.py --attention > "$OUT/attention.txt" 2>&1
    echo "rc $?" >> "$OUT/attention.txt"
fi
# 4. With what is left: Inductor's default mode and SDPA (the configuration of the earlier H200 calls),
#    on the same machine, for the spread between machines.
left=$((END - SECONDS))
if [ "$left" -gt 120 ]; then
    timeout "$left" python3 benchmarks/gpu_step.py --batch 64 --steps 60 --workers 12 --compile true \
        --data /tmp/jpegs > "$OUT/gpu_step_default.txt" 2>&1
    echo "rc $?" >> "$OUT/gpu_step_default.txt"
fi
tail -n 12 "$OUT"/gpu_step*.txt "$OUT/gpu_check.txt"
cat "$OUT/attention.txt" 2>/dev/null
# If device time is left and MFU stayed short of 0.40: the second call, `gpu_session.sh autotune` (above).
# Else: `benchmarks/views.py` (the views eager against compiled, <= 60 s) and
# `gpu_step.py --workers 8 --compile reduce-overhead --pretrain-attention flex` (fewer loader workers).
