#!/usr/bin/env bash
# Issue 17's ablation (docs/results.md, "Token-adaptive MoD against static pruning"): one budget per call.
#   bash launch/ablate_token_adaptive.sh TAG RATE LAYERS_DELETED VARIANTS OVERRIDES [extra ablate.py flags]
# e.g. bash launch/ablate_token_adaptive.sh b13 0.5 13 '[dense,pruned_trained,r1d]' \
#        '{"r1d":{"init":"routed","mod":{"sink_tokens":1,"rate_hold":"window"}}}'
# MODEL (default smollm2) and RECIPE pick the base model and the data recipe; give a non-SmolLM2 model a copy of the
# recipe whose `tokenizer:` is that model's directory. Writes runs/abl17/TAG/{results.json,table.md}.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
MODEL=${MODEL:-$(.venv/bin/python -c "from mod_train.offline import resolve_model; print(resolve_model('smollm2'))")}
RECIPE=${RECIPE:-data_recipes/offline_long_mix.yaml}
MO='"layers":"all","dense_first":2,"dense_last":2,"router_input":"norm","gate_form":"ste","target_scope":"global"'
exec .venv/bin/python launch/ablate.py --model "$MODEL" --recipe "$RECIPE" --out "runs/abl17/$1" \
  --steps 30 --seq_len 512 --lr 1e-3 --router_lr 1e-3 --warmup_steps 4 --trainable lora --init allocated \
  --target_weight 2.0 --train_overrides '{"objective":"kd","rate_control":"thresholds","lora_rank":16,"lora_alpha":32}' \
  --eval_docs 4 --eval_tokens 2048 --eval_length 1024 --prefill_tokens 1024 --prefill_repeats 1 \
  --init_rate "$2" --target_rate "$2" --prune_layers "$3" --mod_overrides "{$MO}" --progress false \
  --variants "$4" --variant_overrides "$5" "${@:6}"
