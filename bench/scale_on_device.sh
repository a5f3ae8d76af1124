#!/usr/bin/env bash
# bench/scale.py on a lent GPU machine, as one command (issue 24 item 7).
#
# That machine has its own python3 with torch and CUDA but not this project's pins, nor the
# embedded model's wheel or the packaged data sources. Prepare here, once:
#   .whl/            wheels of the packages its image lacks or has too old (transformers, peft,
#                    trl, datasets, pydantic, huggingface_hub and what they need; the device
#                    README's `pip download` line)
#   .scale-inputs/   tokenizer/ (the embedded model's, saved) and data/ (a data folder built by
#                    `bench/scale.py`'s own data_folder(): refusals only, no model needed)
# then run it there with carry [".whl", ".scale-inputs"]:
#   bash bench/scale_on_device.sh                 # 1B and 8B, every arm
#   SIZES=1b bash bench/scale_on_device.sh --skip full
# A CPU dry run here: PY=.venv/bin/python WHEELS=0 SIZES=tiny OUT="$(mktemp -d)" bash bench/scale_on_device.sh
# The results land in $OUT/scale.json; each measured row is also printed as a JSON line.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
SITE=${TMPDIR:-/tmp}
SITE=$SITE/scale-site  # the wheels' install folder
if [ "${WHEELS:-1}" = 1 ]; then
  rm -rf "$SITE"  # a warm machine keeps an earlier call's packages: `--upgrade --target` removes none
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 1
  export PYTHONPATH=$SITE:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1 \
  HF_DATASETS_DISABLE_PROGRESS_BARS=1 SAFETY_PATCH_HOME=${SAFETY_PATCH_HOME:-${TMPDIR:-/tmp}/safety-patch-home}
"$PY" -c "import sys, torch, transformers, peft, trl, datasets; print('python', sys.version.split()[0], 'torch', torch.__version__,
'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__, 'datasets', datasets.__version__,
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))" || exit 1
df -h /tmp | tail -1
extra=()
[ "${SIZES:-}" = tiny ] && extra=(--tiny) || extra=(--sizes "${SIZES:-1b,8b}" --lora-batch-sizes "${LORA_BATCH_SIZES:-8,32}")
timeout "${SCALE_TIMEOUT:-540}" "$PY" bench/scale.py "${extra[@]}" --tokenizer .scale-inputs/tokenizer \
  --data .scale-inputs/data --results "${RESULTS:-scale}" "$@"
rc=$?
if [ -n "${OUT:-}" ]; then  # the lent machine's folder whose files come back
  mkdir -p "$OUT" && cp bench/results/"${RESULTS:-scale}".json "$OUT"/ 2>/dev/null
fi
exit $rc
