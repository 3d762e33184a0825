#!/usr/bin/env bash
# GPU benchmarks in one call on one H100/H200: the SD-1.5-sized train step (full ID²Face vs bare
# diffusers UNet, bf16) and anonymize throughput (25 DDIM steps, batch 64), FID feature extraction.
# Prints each table; each script's last line is its JSON figures.
#   bash benchmarks/gpu.sh                   # default parts, < 5 min: cached sample fid
#   bash benchmarks/gpu.sh cached cached_sdpa harmonizer   # < 6 min: the step's overhead and its suspects
#   bash benchmarks/gpu.sh sample_compiled    # torch.compile parts: sampling < 240 s,
#   bash benchmarks/gpu.sh cached_compiled    # training up to 360 s (our UNet compiled, fwd + bwd: MFU)
#   bash benchmarks/gpu.sh attention_sampling anonymize_compiled   # the 20 faces/s target's call (< 8.5 min)
#   bash benchmarks/gpu.sh attention cached_compiled                # the MFU target's call (< 7 min)
#   BATCH=16 PEAK=790e12 bash benchmarks/gpu.sh   # BATCH images per train step (default 32 = 16 pairs)
#   CONFIG="ablations/harmonizer_sum.yaml model.loss.id_dropout=0.2" bash benchmarks/gpu.sh cached sample
#       # CONFIG: config files and key=value layered on the model of every train, sample and anonymize part
# Parts: eager (encodes in the step), cached (data.latent_cache: latents and identity embeddings
# read from the batch; also timed back to back, and its GPU kernels listed where they differ from
# the bare step's), cached_low_norms (the same with the UNet's and the attribute encoder's
# GroupNorms and LayerNorms in bf16: low_precision_norms), cached_sdpa (the same with the
# harmonizer's attention computed by two SDPA kernels and a lerp: harmonizer attention=sdpa),
# harmonizer (one cross-attention layer per SD-1.5 level: both attention paths vs stock),
# attention, attention_sampling (the UNet's self-attention per SDPA backend, flash, memory-efficient,
# cuDNN, forward + backward and forward alone; they run first, and the train, resp. the sample and
# anonymize, parts after them use the order they found fastest),
# sample_grid (faces/s vs steps, batch and sampler, eager: the issue's sampling table at SD-1.5 size),
# sample_bf16 (the sample part's first row with the UNet's and the SD VAE's weights and norms in
# bf16 and the harmonizer's sdpa path, decoded by the VAE, by TAESD's architecture, and with that
# encoding too),
# anonymize_fast (the anonymize part with those, TAESD's architecture encoding too, and depth 64:
# what the 20 faces/s target needs, eager; detection and alignment in 1 and in 4 threads),
# anonymize_compiled (the same compiled, cuDNN's algorithm search at the first batch, 4 detect
# threads, MTCNN on the GPU and on the host's cores: two rows, one compile; < 450 s),
# detection (MTCNN per photo, facenet-pytorch's and ours, the GPU idle and kept busy; the host's
# alignment per face: < 115 s),
# compiled (+ channels_last + torch.compile of both UNets), cached_compiled (the cached step with
# our UNet compiled and its and the attribute encoder's norms in bf16, cuDNN's algorithm search on,
# the bare one eager: the MFU target's figure), sample, sample_compiled (+ channels_last +
# compile of the UNet and the VAE), anonymize (the whole file pipeline end to end: MTCNN,
# alignment, sampling, paste-back, 12 MP JPEGs decoded and written by I/O threads, stages in turn
# and in worker threads; < 4 min; the anonymize parts also run the photos twice over for the
# steady rate, fill and drain cancelled: anonymize_throughput.py --steady), fid, switches (cached
# step with plain AdamW, flash attention only, gradient checkpointing, cuDNN's algorithm search: ~4 min),
# loop (Lightning's fit as the train command runs it, loader to EMA, vs the step it is made of: < 4 min).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
export HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore::UserWarning
BATCH=${BATCH:-32}
PEAK=${PEAK:-989e12}
PARTS=" ${*:-cached sample fid} "
want() { [[ $PARTS == *" $1 "* ]]; }
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "benchmarks/gpu.sh: no CUDA device visible to torch; these are GPU benchmarks." >&2
  echo "On CPU run: $PY benchmarks/train_step.py --profile tiny --device cpu (see BENCHMARKS.md)" >&2
  exit 2
fi
exec 2>&1  # the scripts' progress lines (stderr) go wherever the tables go: a capped part says where its time went
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

train() {  # train TIMEOUT STEPS WARMUP [flags]: at BATCH; retried at BATCH/2 if it failed (not timed out)
  local limit=$1 steps=$2 warmup=$3; shift 3
  echo; echo "== train_step sd15 $* (batch $BATCH)"
  timeout "$limit" "$PY" benchmarks/train_step.py --profile sd15 --device cuda --batch "$BATCH" --steps "$steps" \
      --warmup "$warmup" --peak-flops "$PEAK" "${TRAIN_MODEL[@]}" "$@"
  local rc=$?
  if [ $rc -ne 0 ] && [ $rc -ne 124 ]; then
    echo "== failed (exit $rc) at batch $BATCH, e.g. out of memory; retrying at batch $((BATCH / 2))"
    timeout "$limit" "$PY" benchmarks/train_step.py --profile sd15 --device cuda --batch $((BATCH / 2)) \
        --steps "$steps" --warmup "$warmup" --peak-flops "$PEAK" "${TRAIN_MODEL[@]}" "$@"
  elif [ $rc -eq 124 ]; then
    echo "== timed out after ${limit}s"
  fi
}

# The attention parts run first: SD-1.5's self-attention (40-wide heads at 4096 tokens) under each
# SDPA backend (< 60 s each). The parts after them run the UNet's attention in the order found
# fastest (model.backbone.params.sdpa_backends): `attention` (forward + backward, batch BATCH) for
# the train parts, `attention_sampling` (forward, batch 64) for the sample and anonymize parts.
TRAIN_ATTENTION=() SAMPLE_ATTENTION=() ANONYMIZE_ATTENTION=()
attention_order() {  # attention_order FLAGS...: runs attention_backends.py, prints its fastest order (a,b,c)
  local log; log=$(mktemp)
  timeout 60 "$PY" benchmarks/attention_backends.py --device cuda "$@" | tee "$log" >&2 \
      || echo "== attention_backends failed or timed out (exit $?)" >&2
  tail -n 1 "$log" | "$PY" -c 'import json, sys; print(",".join(json.load(sys.stdin)["fastest_first"]))' 2>/dev/null
  rm -f "$log"
}
if want attention; then
  echo; echo "== SD-1.5 self-attention, forward + backward, batch $BATCH, bf16, per SDPA backend"
  order=$(attention_order --batch "$BATCH")
  if [ -n "$order" ]; then
    TRAIN_ATTENTION=(--override "model.backbone.params.sdpa_backends=[$order]")
    echo "== the train parts below: model.backbone.params.sdpa_backends=[$order]"
  fi
fi
if want attention_sampling; then
  echo; echo "== SD-1.5 self-attention, forward only (sampling), batch 64, bf16, per SDPA backend"
  order=$(attention_order --batch 64 --forward-only)
  if [ -n "$order" ]; then
    SAMPLE_ATTENTION=(--override "model.backbone.params.sdpa_backends=[$order]")
    ANONYMIZE_ATTENTION=(--attention-backends ${order//,/ })
    echo "== the sample and anonymize parts below: the UNet's attention in the order $order"
  fi
fi
# The model of every part below: the attention order found, then the user's CONFIG.
read -r -a CONFIG_OVERRIDES <<< "${CONFIG:-}"
[ ${#CONFIG_OVERRIDES[@]} -gt 0 ] && CONFIG_OVERRIDES=(--override "${CONFIG_OVERRIDES[@]}")
TRAIN_MODEL=("${TRAIN_ATTENTION[@]}" "${CONFIG_OVERRIDES[@]}")
SAMPLE_MODEL=("${SAMPLE_ATTENTION[@]}" "${CONFIG_OVERRIDES[@]}")
ANONYMIZE_MODEL=("${ANONYMIZE_ATTENTION[@]}" "${CONFIG_OVERRIDES[@]}")

# Time caps keep the default parts under 5 minutes (a retry after an out-of-memory failure adds one).
# An SD-1.5 train part spends ~45 s before its first timed step (imports, two UNets built, FLOPs
# counted; H100, 2026-11-27): the 90 s cap of the cached part with --kernel-table cut it off.
want eager && train 80 8 1 --bf16 --breakdown
want cached && train 150 6 1 --bf16 --cached-latents --breakdown --back-to-back 4
want cached_low_norms && train 150 6 1 --bf16 --cached-latents --breakdown --back-to-back 4 \
    --override model.backbone.params.low_precision_norms=true model.attribute_encoder.params.low_precision_norms=true
want cached_sdpa && train 150 6 1 --bf16 --cached-latents --back-to-back 4 --kernel-table 15 \
    --override model.harmonizer.params.attention=sdpa
if want loop; then  # what the training loop adds to its step (< 4 min)
  echo; echo "== train loop sd15 as configured (8 pairs, VAE encodes in the step, bf16, uint8 batches, 8 workers,"
  echo "   EMA every 10 steps) vs its step; crops of colour fields where scikit-image is missing (they decode faster)"
  timeout 240 "$PY" benchmarks/train_loop.py --profile sd15 --device cuda --steps 6 --warmup 2 \
      "${TRAIN_MODEL[@]}" || echo "== train_loop failed or timed out (exit $?)"
fi
if want harmonizer; then
  echo; echo "== harmonizer cross-attention layer vs stock, SD-1.5 levels, batch $BATCH, bf16"
  timeout 40 "$PY" benchmarks/harmonizer_attention.py --device cuda --bf16 --batch "$BATCH" --repeats 10 \
      || echo "== harmonizer_attention failed or timed out (exit $?)"
fi
if want sample; then
  echo; echo "== sample sd15, 25 DDIM steps, batch 64, bf16 (none and cfg guidance)"
  timeout 100 "$PY" benchmarks/sample.py --profile sd15 --device cuda --bf16 --steps 25 --batch 64 \
      "${SAMPLE_MODEL[@]}" --samplers ddim --cfg --repeats 1 --breakdown \
      || echo "== sample failed or timed out (exit $?)"
fi
if want sample_grid; then  # the issue's sampling grid at SD-1.5 size: faces/s vs steps, batch and sampler (< 150 s)
  echo; echo "== sample sd15, bf16, 10 and 25 steps x batch 16 and 64 x DDIM and DPM-Solver++, no guidance"
  timeout 150 "$PY" benchmarks/sample.py --profile sd15 --device cuda --bf16 --steps 10 25 --batch 16 64 \
      "${SAMPLE_MODEL[@]}" --samplers ddim dpm_solver --repeats 1 \
      || echo "== sample failed or timed out (exit $?)"
fi
if want sample_bf16; then
  echo; echo "== sample sd15, 25 DDIM steps, batch 64, the UNet and the SD VAE with bf16 weights and arithmetic"
  echo "   (model.backbone/first_stage.params.dtype), decoded by the VAE, by TAESD's architecture, and that encoding too"
  timeout 90 "$PY" benchmarks/sample.py --profile sd15 --device cuda --bf16 --steps 25 --batch 64 \
      "${SAMPLE_MODEL[@]}" --samplers ddim --repeats 1 --decoders own taesd taesd_both --breakdown \
      --override model.first_stage.params.dtype=bfloat16 model.backbone.params.dtype=bfloat16 \
                 model.harmonizer.params.attention=sdpa \
      || echo "== sample failed or timed out (exit $?)"
fi
if want anonymize; then  # the issue's end-to-end figure: files in, files out
  echo; echo "== anonymize end to end, untrained sd15 at 512 px, 25 DDIM steps, bf16: 32 photos 12 MP JPEG x 4 faces,"
  echo "   4 I/O threads, stages in turn (depth 0) and in worker threads 64 photos deep (--pipeline-depth)"
  timeout 240 "$PY" benchmarks/anonymize_throughput.py --profile sd15 --device cuda --precision bf16-mixed \
      "${ANONYMIZE_MODEL[@]}" --photos 32 --faces-per-photo 4 --batch-sizes 64 --io-workers 4 \
      --pipeline-depth 0 64 --threads 4 --photo-size 4032 3024 --photo-format jpg --steady \
      || echo "== anonymize_throughput failed or timed out (exit $?)"
fi
if want detection; then  # MTCNN per photo at anonymize's 2048 px, GPU idle and busy; alignment (< 115 s)
  echo; echo "== MTCNN per photo: facenet-pytorch's detect vs id2face's (no host read per candidate), 12 MP photos;"
  echo "   busy: ours also on a stream of the pipeline's stage priority"
  timeout 45 "$PY" benchmarks/face_detection.py --device cuda --photos 8 --sides 2048 \
      || echo "== face_detection failed or timed out (exit $?)"
  timeout 50 "$PY" benchmarks/face_detection.py --device cuda --photos 8 --sides 2048 --busy-gpu \
      || echo "== face_detection failed or timed out (exit $?)"
  echo; echo "== alignment per face on this machine's host, 512 px crops of 12 MP photos"
  timeout 20 "$PY" benchmarks/face_alignment.py || echo "== face_alignment failed or timed out (exit $?)"
fi
FAST_ANONYMIZE="--profile sd15 --device cuda --precision bf16-mixed --photos 32 --faces-per-photo 4 --batch-sizes 64
  --io-workers 4 --pipeline-depth 64 --threads 4 --vae-dtype bfloat16 --unet-dtype bfloat16 --tiny-decoder random
  --tiny-encoder --harmonizer-attention sdpa --photo-size 4032 3024 --photo-format jpg --steady"
if want anonymize_fast; then  # what the 20 faces/s target needs of the pipeline, eager
  echo; echo "== anonymize end to end as above, depth 64, UNet in bf16, TAESD-architecture encoder and decoder,"
  echo "   detection and alignment in 1 and in 4 threads (--detect-workers)"
  timeout 260 "$PY" benchmarks/anonymize_throughput.py $FAST_ANONYMIZE "${ANONYMIZE_MODEL[@]}" \
      --detect-workers 1 4 || echo "== anonymize_throughput failed or timed out (exit $?)"
fi
if want anonymize_compiled; then  # the same compiled (UNet, VAE encoder, TAESD decoder): the target's run
  echo; echo "== anonymize end to end as anonymize_fast (4 detect threads), + channels_last + torch.compile;"
  echo "   MTCNN on the GPU, then on the CPU (the GPU left to the sampling)"
  timeout 450 "$PY" benchmarks/anonymize_throughput.py $FAST_ANONYMIZE "${ANONYMIZE_MODEL[@]}" \
      --compile --cudnn-benchmark --detect-workers 4 --detect-devices cuda cpu \
      || echo "== anonymize_throughput failed or timed out (exit $?)"
fi
if want sample_compiled; then
  echo; echo "== sample sd15, 25 DDIM steps, batch 64, bf16, channels_last + compile (UNet, VAE)"
  timeout 240 "$PY" benchmarks/sample.py --profile sd15 --device cuda --bf16 --steps 25 --batch 64 \
      "${SAMPLE_MODEL[@]}" --samplers ddim --repeats 2 --channels-last --compile --breakdown \
      || echo "== sample failed or timed out (exit $?)"
fi
# Compiling both SD-1.5 UNets' forward + backward takes over 240 s on a fresh machine (cold
# inductor cache): give a compiled train part a call of its own.
want compiled && train 450 4 1 --bf16 --channels-last --compile
# The MFU target's run needs only our step compiled: the bare step stays eager (half the compiling).
# Norms in bf16: the eager step's MFU 20.4 -> 22.8 % (H100, 2026-11-27); no measurable cost in quality.
# cuDNN's algorithm search (trainer.benchmark): fixed shapes, so the warm-up step's search is paid once.
want cached_compiled && train 360 4 1 --bf16 --channels-last --compile --eager-bare --cached-latents \
    --cudnn-benchmark --override model.backbone.params.low_precision_norms=true \
    model.attribute_encoder.params.low_precision_norms=true
if want switches; then  # our step under each remaining switch; compare its "full" row with the cached part's
  train 80 6 1 --bf16 --cached-latents --no-fused
  train 80 6 1 --bf16 --cached-latents --override "model.backbone.params.sdpa_backends=[flash_attention]"
  train 80 6 1 --bf16 --cached-latents --override model.backbone.params.gradient_checkpointing=true
  train 80 6 1 --bf16 --cached-latents --cudnn-benchmark
fi
if want fid; then
  echo; echo "== FID feature extraction (Inception-v3, 512 px inputs) vs N"
  timeout 40 "$PY" benchmarks/fid_features.py --device cuda --sizes 1024 4096 --batch 256 --image-size 512 \
      || echo "== fid_features failed or timed out (exit $?)"
fi
echo; echo "== gpu.sh total ${SECONDS}s"
