#!/usr/bin/env bash
# Train the small embedded default DetailFlow model on Fashion-MNIST, end to end:
#   perceptual feature net -> tokenizer -> PatchGAN stages (decoder, then whole tokenizer) -> code
#   extraction -> prior -> decoder polish (PatchGAN, EMA), into OUT_DIR/{perceptual, tokenizer,
#   tokenizer_gan_decoder, tokenizer_gan, codes.npz, prior, tokenizer_polish}; the tokenizer to
#   ship is named in OUT_DIR/ship_tokenizer.txt (convert it with the flag in ship_tokenizer_ema.txt).
#
#   DEVICE=cuda scripts/train_default_model.sh OUT_DIR        # the real recipe (one H200; see below)
#   DEVICE=cpu STEPS_SCALE=0.002 TOK_BATCH=16 PRIOR_BATCH=16 EXTRACT_LIMIT=256 PERCEPTUAL_EPOCHS=1 \
#       scripts/train_default_model.sh /tmp/df-smoke           # CPU smoke test (with CPU_BF16=1 and
#       PERCEPTUAL_WEIGHT=0 it ran in 32 s on 2 idle cores, session 7)
#
# Model: 32x32 images, patch 4 (8x8 grid), NUM_TOKENS latent tokens (default 64), group_size 4 (causal_num 4),
# codebook 1024 x 8 (L2-normalized), encoder/decoder siglip2_custom_L4_D128_H4 trained from
# scratch (resolution degradation p=0.2, self-correction on); prior GPT-custom-L6-D256-H8
# (10 classes + null class, class dropout 0.1, correction_prob 0.3, EMA).
# Weights: tokenizer ~1.7M params, prior ~5.7M: ~15 MB in fp16/bf16 (inference tensors only).
# Measured on one H200 in session 1, before the perceptual and PatchGAN stages existed (bf16 autocast,
# torch 2.11): tokenizer 2200 steps x 512 in 132 s (54 ms/step), extraction of 60k images + flips 7 s,
# prior 3800 steps x 1024 in 120 s (29 ms/step); 259 s in all. Final train losses: tokenizer rec (MSE
# in [-1,1]) 0.062, prior CE 0.94; see */log.jsonl. The recipe as it stands has not run on a GPU.
#
# The perceptual loss (weight PERCEPTUAL_WEIGHT, default 4; 0 = off) compares conv features of a
# FashionCNN trained here on the train split with seed 1 (detailflow_ref.fmnist_perceptual), not
# the evaluation classifier. The stage order follows the shipped model's CPU history (its model
# card), with fewer, larger steps.
#
# Knobs (environment): DEVICE (cuda | cpu, default cuda if available), STEPS_SCALE (multiplies
# both step counts, default 1), TOK_STEPS / PRIOR_STEPS (override the counts), TOK_BATCH /
# PRIOR_BATCH, EXTRACT_LIMIT (encode only the first N training images), PERCEPTUAL_WEIGHT,
# PERCEPTUAL_EPOCHS (default 5), GAN_WEIGHT / GAN_STEPS (stages 2-3, each; GAN_WEIGHT=0 skips 2, 3, 6),
# POLISH_STEPS (stage 6; 0 skips it), CPU_BF16=1 (bf16
# autocast on the CPU: AMX / AVX512-BF16 CPUs), PYTHON, DETAILFLOW_FASHION_MNIST (dataset folder).
# Every stage refuses to overwrite existing outputs.
set -euo pipefail

OUT=${1:?usage: $0 OUT_DIR}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
# Works from a plain checkout too (no pip install needed).
export PYTHONPATH="$REPO/python:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if [ -z "${DEVICE:-}" ]; then
  DEVICE=$($PY -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
fi
MP=bf16
CPU_ARGS=()
if [ "$DEVICE" = cpu ]; then
  MP=none
  [ -n "${CPU_BF16:-}" ] && CPU_ARGS=(--cpu-bf16)
fi
STEPS_SCALE=${STEPS_SCALE:-1}
scale() { $PY -c "import sys; print(max(1, int(round(int(sys.argv[1]) * float(sys.argv[2])))))" "$1" "$STEPS_SCALE"; }
TOK_STEPS=${TOK_STEPS:-$(scale 2200)}
PRIOR_STEPS=${PRIOR_STEPS:-$(scale 3800)}
TOK_BATCH=${TOK_BATCH:-512}
PRIOR_BATCH=${PRIOR_BATCH:-1024}
LIMIT_ARGS=()
[ -n "${EXTRACT_LIMIT:-}" ] && LIMIT_ARGS=(--limit "$EXTRACT_LIMIT")
every() { $PY -c "import sys; print(max(1, int(sys.argv[1]) // int(sys.argv[2])))" "$1" "$2"; }

PERCEPTUAL_WEIGHT=${PERCEPTUAL_WEIGHT:-4.0}
PERCEPTUAL_ARGS=()
# The tokenizer's model and training flags, shared by stages 1-3 (--init-from refuses a mismatch).
TOK_ARGS=(--data fashion-mnist --device "$DEVICE" --mixed-precision "$MP"
  --image-size 32 --encoder-patch-size 4 --decoder-patch-size 4 --num-latent-tokens "${NUM_TOKENS:-64}"
  --group-size 4 --codebook-size 1024 --codebook-embed-dim 8
  --encoder-model siglip2_custom_L4_D128_H4 --decoder-model siglip2_custom_L4_D128_H4
  --degradation-prob 0.2 --correction-training --correction-top-k 50)

mkdir -p "$OUT"
T0=$(date +%s)
echo "device=$DEVICE tokenizer_steps=$TOK_STEPS prior_steps=$PRIOR_STEPS batch=$TOK_BATCH/$PRIOR_BATCH" \
  "perceptual_weight=$PERCEPTUAL_WEIGHT" | tee "$OUT/recipe.txt"

# 0. The perceptual loss's feature network: a FashionCNN of its own (seed 1), CPU.
if [ "$PERCEPTUAL_WEIGHT" != 0 ] && [ "$PERCEPTUAL_WEIGHT" != 0.0 ]; then
  mkdir -p "$OUT/perceptual"
  $PY -m detailflow_engine.train_classifier --out "$OUT/perceptual/fmnist_seed1.safetensors" --seed 1 \
    --epochs "${PERCEPTUAL_EPOCHS:-5}" --threads "$($PY -c 'import os; print(min(8, os.cpu_count()))')"
  export DETAILFLOW_PERCEPTUAL_WEIGHTS="$OUT/perceptual/fmnist_seed1.safetensors"
  PERCEPTUAL_ARGS=(--perceptual-net detailflow_ref.fmnist_perceptual:feature_net --perceptual-weight "$PERCEPTUAL_WEIGHT")
fi
TP=$(date +%s)

# 1. Tokenizer (official defaults otherwise: Adam betas 0.9/0.95, LR scaled by batch/256,
#    warmup 5% then cosine to 0.1x, grad clip 1.0, L2 reconstruction + VQ/commit(0.25)).
$PY -m detailflow_ref.train_tokenizer \
  --results-dir "$OUT/tokenizer" "${TOK_ARGS[@]}" "${PERCEPTUAL_ARGS[@]}" "${CPU_ARGS[@]}" \
  --lr 3e-4 --global-batch-size "$TOK_BATCH" --max-steps "$TOK_STEPS" \
  --log-every "$(every "$TOK_STEPS" 60)" --vis-every "$(every "$TOK_STEPS" 3)" --global-seed 0
T1=$(date +%s)

# 2-3. The PatchGAN stages (hinge loss, weight GAN_WEIGHT, default 0.05, next to the L2 and perceptual
#    losses), as the shipped model was made: first the decoder alone against a fresh discriminator
#    (encoder and codebook frozen), then the whole tokenizer, keeping that trained discriminator
#    (--init-from carries it: a fresh one judged poorly for hundreds of steps). Sharper decodes
#    lower the Frechet distance. GAN_WEIGHT=0 skips both and ships $OUT/tokenizer as is.
GAN_WEIGHT=${GAN_WEIGHT:-0.05}
GAN_ON=1; { [ "$GAN_WEIGHT" = 0 ] || [ "$GAN_WEIGHT" = 0.0 ]; } && GAN_ON=0
# The flags of every PatchGAN stage (2, 3 and 6), for STEPS at LR, into GAN_ARGS.
gan_args() {
  GAN_ARGS=("${TOK_ARGS[@]}" "${PERCEPTUAL_ARGS[@]}" "${CPU_ARGS[@]}" --disc-weight "$GAN_WEIGHT" --disc-start 0
    --lr "$2" --global-batch-size "$TOK_BATCH" --max-steps "$1"
    --log-every "$(every "$1" 60)" --vis-every "$(every "$1" 3)")
}
SHIP_TOKENIZER="$OUT/tokenizer"
if [ "$GAN_ON" = 1 ]; then
  gan_args "${GAN_STEPS:-$(scale 1000)}" 1e-4
  $PY -m detailflow_ref.train_tokenizer --init-from "$OUT/tokenizer" --train-decoder-only \
    --results-dir "$OUT/tokenizer_gan_decoder" "${GAN_ARGS[@]}" --global-seed 1
  TG=$(date +%s)
  $PY -m detailflow_ref.train_tokenizer --init-from "$OUT/tokenizer_gan_decoder" \
    --results-dir "$OUT/tokenizer_gan" "${GAN_ARGS[@]}" --global-seed 2
  SHIP_TOKENIZER="$OUT/tokenizer_gan"
else
  TG=$T1
fi
T2=$(date +%s)

# 4. Codes of every training image and its flip (clean, self-correction input, target), from the
#    tokenizer that ships: the prior must learn the codes its decoder reads.
$PY -m detailflow_ref.extract_codes \
  --vq-path "$SHIP_TOKENIZER" --data fashion-mnist --split train --out "$OUT/codes.npz" \
  --device "$DEVICE" --mixed-precision "$MP" --batch-size 1024 --global-seed 0 "${LIMIT_ARGS[@]}" "${CPU_ARGS[@]}"
T3=$(date +%s)

# 5. Prior (official: AdamW wd 0.05 on >=2-D weights, warmup 5% + cosine to 0.01x, clip 1.0,
#    dropout 0.1, class dropout 0.1, correction_prob 0.3; EMA decay 0.999 for this short run).
$PY -m detailflow_ref.train_prior \
  --results-dir "$OUT/prior" --code-path "$OUT/codes.npz" --tokenizer "$SHIP_TOKENIZER" \
  --device "$DEVICE" --mixed-precision "$MP" --gpt-model GPT-custom-L6-D256-H8 \
  --lr 1e-3 --global-batch-size "$PRIOR_BATCH" --max-steps "$PRIOR_STEPS" --ema-decay 0.999 \
  --correction-prob 0.3 --class-dropout-prob 0.1 --cfg-scale 2.0 "${CPU_ARGS[@]}" \
  --log-every "$(every "$PRIOR_STEPS" 60)" --vis-every "$(every "$PRIOR_STEPS" 3)" --global-seed 0
T4=$(date +%s)

# 6. Decoder polish: the decoder alone on against the same PatchGAN, keeping an EMA of its weights
#    (decay 0.999); the encoder, codebook and self-correction path stay frozen (bit-exact in the
#    EMA too), so the prior of 5 stays valid. The EMA weights ship (convert --ema). POLISH_STEPS=0
#    (or GAN_WEIGHT=0) skips it.
POLISH_STEPS=${POLISH_STEPS:-$(scale 1000)}
SHIP_EMA=--no-ema
if [ "$GAN_ON" = 1 ] && [ "$POLISH_STEPS" != 0 ]; then
  gan_args "$POLISH_STEPS" 2e-4
  $PY -m detailflow_ref.train_tokenizer --init-from "$SHIP_TOKENIZER" --train-decoder-only \
    --results-dir "$OUT/tokenizer_polish" "${GAN_ARGS[@]}" --ema --ema-decay 0.999 --global-seed 3
  SHIP_TOKENIZER="$OUT/tokenizer_polish"
  SHIP_EMA=--ema
fi
T5=$(date +%s)
# What to ship, for scripts/device_session.sh and users: convert ship_tokenizer with ship_tokenizer_ema.
echo "$SHIP_TOKENIZER" > "$OUT/ship_tokenizer.txt"
echo "$SHIP_EMA" > "$OUT/ship_tokenizer_ema.txt"

printf '{"perceptual_s": %d, "tokenizer_s": %d, "gan_decoder_s": %d, "gan_tokenizer_s": %d, "extract_s": %d, "prior_s": %d, "polish_s": %d, "total_s": %d}\n' \
  $((TP - T0)) $((T1 - TP)) $((TG - T1)) $((T2 - TG)) $((T3 - T2)) $((T4 - T3)) $((T5 - T4)) $((T5 - T0)) | tee "$OUT/timing.json"
echo "done: tokenizer $SHIP_TOKENIZER ($SHIP_EMA), prior $OUT/prior (losses in */log.jsonl, grids in */samples/)"
