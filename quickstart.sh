#!/usr/bin/env bash
# Quick start (README command 2): tokenize the bundled sample, pretrain a tiny model on CPU for a bounded number
# of steps (a few minutes), then continue a prompt with it. Leaves out/pretrain_128.pth (+ its .json config).
#
#   bash quickstart.sh
#   QUICKSTART_STEPS=50 bash quickstart.sh          # shorter (the test suite runs it this way)
#   PYTHON=.venv/bin/python bash quickstart.sh      # a specific interpreter
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}
STEPS=${QUICKSTART_STEPS:-200}
OUT_DIR=${QUICKSTART_OUT_DIR:-out}  # QUICKSTART_IMAGES_DIR (default images) gets the loss PNG
# A small model that learns the sample in minutes on two CPU cores.
MODEL="--dim 128 --n_layers 4 --n_heads 4 --n_kv_heads 2 --max_seq_len 64"

echo "== 1/3 tokenize dataset/pretrain_sample.jsonl"
$PYTHON data_process.py pretrain --input dataset/pretrain_sample.jsonl --output "$OUT_DIR/pretrain_sample.bin" \
    --workers 1

echo "== 2/3 pretrain for $STEPS steps on CPU"
$PYTHON 1-pretrain.py $MODEL --data_path "$OUT_DIR/pretrain_sample.bin" --out_dir "$OUT_DIR" \
    --device cpu --dtype float32 --batch_size 8 --max_steps "$STEPS" --learning_rate 3e-3 --warmup_iters 20 \
    --weight_decay 0.01 --save_interval 200 --num_workers 0 \
    --images_dir "${QUICKSTART_IMAGES_DIR:-images}"

echo "== 3/3 continue a prompt"
# No model flags: the shape is read from out/pretrain_128.json, written beside the weights.
$PYTHON 0-eval_pretrain.py --ckpt "$OUT_DIR/pretrain_128.pth" --device cpu --prompt "长江是" \
    --prompt "植物通过" --max_new_tokens 40 --temperature 0
