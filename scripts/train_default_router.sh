#!/usr/bin/env bash
# Rebuild the router that ships with tierroute (src/tierroute/resources/default_router;
# its CARD.md says what it is trained on and how it scores). Fixed seed: the same data
# and embedding model give the same weights.
#
#   bash scripts/train_default_router.sh [DATA_DIR]    (default ../shared/data)
#   STATIC=1 bash scripts/train_default_router.sh      the same recipe on the static table
#                                                      (default_router_static: `default-static`)
#
# Only data whose licence allows a shipped model: MMLU outcomes (RouteLLM, Apache-2.0)
# and the RouterBench subset (MIT). Never the AlpacaEval file (CC BY-NC, evaluation only).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
OUT=src/tierroute/resources/default_router
if [ -n "${STATIC:-}" ]; then
  OUT=src/tierroute/resources/default_router_static
  export TIERROUTE_EMBED_PRECISION=static
fi
FILES=(--data "$DATA/mmlu_gpt4_mixtral.jsonl" --data "$DATA/routerbench_arc_winogrande_mbpp.jsonl")
PAIR=(--small mistralai/mixtral-8x7b-chat --large gpt-4-1106-preview)

tierroute train --router irt --rule-prior 0.5 --seed 0 "${FILES[@]}" "${PAIR[@]}" --out "$OUT"
# The shipped threshold sends 30% of these prompts to the large tier. A share target
# reads only the score distribution, so calibrating on the training prompts is sound;
# the gateway's controller moves it to a share or budget of your own.
tierroute calibrate --router "$OUT" "${FILES[@]}" "${PAIR[@]}" --target-large-share 0.3
