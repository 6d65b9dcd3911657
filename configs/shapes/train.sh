#!/usr/bin/env bash
# The shapes captioner from nothing to the checkpoint that ships in the package (dvl_jax/assets/shapes):
#   bash configs/shapes/train.sh            # from the repository root; about 30 minutes on 2 CPU cores
# 1. the dataset: 30000 training scenes (seed 0's train split), 200 for eval loss, 500 held out for the score,
#    each as a chat of its caption and questions and as its caption alone, and the tokenizer trained on the
#    training text (dvl_jax/data/shapes.py);
# 2. stage 1: the aligner alone, on the captions; 3. stage 2: everything, on the captions (image-text
#    pretraining); 4. stage 3: everything, on the chats (configs/shapes/stage*.yaml), as DeepSeek-VL's S1, S2, S3;
# 5. the held-out score, per question kind (configs/shapes/evaluate.py) -> runs/shapes/score.json.
# A stage that was interrupted resumes when this script is run again (train.py resumes its run directory).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -f data/shapes/train.jsonl ] || python -m dvl_jax.data.shapes data/shapes --train 30000 --eval 200 --test 500 --seed 0
start=$(date +%s)
python train.py --config configs/shapes/stage0_tower.yaml --no-progress
python train.py --config configs/shapes/stage1_aligner.yaml --no-progress
python train.py --config configs/shapes/stage2_pretrain.yaml --no-progress
python train.py --config configs/shapes/stage3_sft.yaml --no-progress
echo "trained in $(( $(date +%s) - start )) s"
python configs/shapes/evaluate.py --ckpt runs/shapes/stage3/export --data data/shapes/test.jsonl --out runs/shapes/score.json
