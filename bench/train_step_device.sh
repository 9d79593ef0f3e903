#!/usr/bin/env bash
# One device call (issue 24): variants of the Jet-Nemotron-2B stage-1 step at B x 4096 beside the official
# PyTorch anchor, same machine, so the ratios are same-card. Logs as it goes to $OUT/log.txt; one JSON row
# per variant in $OUT/variants.jsonl; the anchor in $OUT/official.json; with PROFILE=name, that variant's
# per-component table (command buffers off) and its trace in $OUT.
#
# Prepare here, once (git-ignored .whl/, carried; never committed):
#   .whl/official_hf/        official jetai/modeling/hf/*.py + configs/jetlm_2B.json + empty __init__.py
#                            (fetch github:NVlabs/Jet-Nemotron; see ../shared/anchors/README.md)
#   .whl/official_train_step.py   a copy of ../shared/anchors/official_train_step.py (../shared does not travel)
#   .whl/anchor/*.whl        fla-core==0.6.0 transformers==4.57.1 huggingface-hub==0.36.0 tokenizers==0.22.1 einops
#   .whl/proj/*.whl          ml_collections==1.1.0 only (the image's flax 0.12.10 matches its jax 0.11.2;
#                            a carried flax 0.12.8 fails to import there)
# Call: run(command="bash bench/train_step_device.sh", carry=[".whl"]); VARIANTS='name|flags;...' overrides;
# 'name|flags|xla flags' runs that row with XLA_FLAGS set to the third field (recorded as its xla_flags).
# The 2B step compiled in about 3 minutes per variant on 2026-12-05; PRECOMPILE=1 compiles every variant
# in parallel first (no GPU preallocation) into JAX's persistent cache, which the timed runs then hit.
# 2026-12-06: a 2B restart served entirely by that cache still spent 135 s in lower().compile() (159 s cold),
# so precompiling saves little; remat none needs XLA_PYTHON_CLIENT_MEM_FRACTION=0.95, and no other GPU process
# may run beside a run that has it. Later that day: the 135 s were the Mosaic GPU conv's kernels; with the Triton
# conv (now impl="auto") the step compiles in 24-44 s cold and 8 s from the cache.
set -u
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
ROOT=$PWD; LOG=$OUT/log.txt; T0=$(date +%s)
VARIANTS=${VARIANTS:-"full|--remat full --attn-impl cudnn --loss-chunk 1024;\
kernels|--remat kernels --attn-impl cudnn --loss-chunk 1024;kernels_b4|--remat kernels --attn-impl cudnn --loss-chunk 1024 --batch 4"}
BENCH="bench/train_scaling.py --preset ${PRESET:-jet_nemotron_2b} --seq ${SEQ:-4096} --steps 6 --batch ${B:-2}"
{ date -u; nvidia-smi --query-gpu=name,clocks.sm,power.limit --format=csv; } | tee "$LOG"
rm -rf /tmp/site /tmp/anchor_site
FLA_WHEELS=""  # FLA=1: the [fla] extra for --gdr-impl fla (.whl/fla/jax_triton*.whl, fla-core and einops in .whl/anchor)
[ "${FLA:-0}" = 1 ] && FLA_WHEELS=".whl/fla/*.whl .whl/anchor/fla_core*.whl .whl/anchor/einops*.whl"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/proj/*.whl $FLA_WHEELS || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/anchor_site .whl/anchor/*.whl || exit 1
export PYTHONPATH=/tmp/site:$ROOT

IFS=';' read -ra ROWS <<< "$VARIANTS"
if [ "${PRECOMPILE:-0}" = 1 ]; then
  echo "== precompiling ${#ROWS[@]} variants in parallel" | tee -a "$LOG"
  for row in "${ROWS[@]}"; do
    XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 400 python3 $BENCH ${row#*|} --compile-only \
      > "/tmp/compile_${row%%|*}.log" 2>&1 &
  done
  wait
  tail -n 1 /tmp/compile_*.log | tee -a "$LOG"
fi

if [ "${ANCHOR:-1}" = 1 ]; then  # ANCHOR=0: no official row (ratios then come from an earlier call)
echo "== official anchor (B=${B:-2}, T=4096; QWEN=1 adds the transformers Qwen2.5-1.5B frozen row)" | tee -a "$LOG"
PYTHONPATH=/tmp/anchor_site OFFICIAL_DIR=$ROOT/.whl/official_hf B=${B:-2} T=4096 timeout 400 python3 -c "
import sys, json, os; sys.path.insert(0, '.whl'); import official_train_step as o
r = o.bench('official Jet-Nemotron-2B stage-1 (fla)', o.official_model(), True)
json.dump(r, open(os.environ['OUT'] + '/official.json', 'w'))
if os.environ.get('QWEN') == '1':
    q = o.bench('Qwen2.5-1.5B shape, frozen MLP+emb (transformers)', o.qwen_model(), True)
    json.dump(q, open(os.environ['OUT'] + '/qwen_transformers.json', 'w'))" 2>&1 | grep -v Warn | tail -n 3 | tee -a "$LOG"
fi

for row in "${ROWS[@]}"; do
  name=${row%%|*}; flags=${row#*|}; xla=""
  [[ $flags == *"|"* ]] && { xla=${flags#*|}; flags=${flags%%|*}; }
  left=$(( ${DEADLINE:-570} - ($(date +%s) - T0) ))
  [ $left -lt 45 ] && { echo "== $name skipped: $left s left of DEADLINE" | tee -a "$LOG"; continue; }
  echo "== [$(( $(date +%s) - T0 ))s] $name: $flags ${xla:+(XLA_FLAGS=$xla)}" | tee -a "$LOG"
  extra=""; env="XLA_FLAGS=$xla"
  if [ "${PROFILE:-}" = "$name" ]; then
    extra="--profile /tmp/prof"; env="XLA_FLAGS=--xla_gpu_enable_command_buffer= $xla"
  fi
  env "$env" timeout $(( left < 400 ? left : 400 )) python3 $BENCH $flags $extra --out "/tmp/row_$name.json" 2>&1 \
    | grep --line-buffered -v "^[IWE][0-9]" | tee -a "$LOG" | tail -n 3
  [ -f "/tmp/row_$name.json" ] && python3 -c "
import json, sys; r = json.load(open('/tmp/row_$name.json'))[0]; r['variant'] = '$name'; r['flags'] = '$flags'
r['xla_flags'] = '$xla'
print(json.dumps(r))" >> "$OUT/variants.jsonl"
  [ -n "$extra" ] && cp /tmp/prof/step.xplane.pb.gz /tmp/prof/step.hlo.txt.gz "$OUT/" 2>/dev/null
done

python3 - <<'EOF' | tee -a "$LOG"
import json, os
out = os.environ["OUT"]
load = lambda f: json.load(open(f"{out}/{f}")) if os.path.exists(f"{out}/{f}") else None
off, qwen = load("official.json"), load("qwen_transformers.json")
rows = [json.loads(x) for x in open(f"{out}/variants.jsonl")] if os.path.exists(f"{out}/variants.jsonl") else []
print(f"{'variant':<10}{'step ms':>9}{'tok/s':>9}{'MFU fa':>8}{'peak GiB':>9}{'x official':>11}")
for r in rows:
    base = qwen if "qwen" in r["flags"] else off  # each row against the anchor of its own shape
    ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
    mfu = f"{r['mfu_frozen_aware']:.1%}" if r["mfu_frozen_aware"] else "-"
    print(f"{r['variant']:<10}{r['step_ms']:>9.1f}{r['tokens_per_s']:>9,.0f}{mfu:>8}"
          f"{r['peak_memory_gib']:>9.1f}{ratio:>11.2f}")
for name, a in (("official", off), ("qwen(hf)", qwen)):
    if a:
        print(f"{name:<10}{a['step_ms']:>9.1f}{a['tokens_per_s']:>9,.0f}{'':>8}{a['peak_mem_gib']:>9.1f}")
EOF
