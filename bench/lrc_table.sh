#!/usr/bin/env bash
# bench/lrc_table.sh — the LRC card's zero-shot table for one checkpoint, written under bench/results/.
#
#     bash bench/lrc_table.sh out/gpt2_124m_openstax                 # offline: 7 of 9 columns (a GPU: < 1 minute)
#     bash bench/lrc_table.sh out/gpt2_124m_openstax --online        # with SciQ and MMLU from the hub
#     bash bench/lrc_table.sh out/tiny --limit 8 --device cpu        # a smoke run (any eval.py flag passes through)
#
# It runs `eval.py --suite lrc --reference` (the published LRC-1.5B-SFT row above ours), keeps eval.json and the
# log, and writes bench/results/lrc_<run>/README.md: the table with the command, date, commit and device.
set -euo pipefail
cd "$(dirname "$0")/.."
ckpt=${1:?usage: bash bench/lrc_table.sh RUN_FOLDER [eval.py flags ...]}
shift
run=$(basename "$(realpath "$ckpt")")
out=bench/results/lrc_${run}
mkdir -p "$out"
cmd=(python eval.py --ckpt "$ckpt" --suite lrc --reference --bpb_file none --out "$out/eval.json" "$@")
"${cmd[@]}" 2>&1 | tee "$out/log.txt"
device=$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['device'])" "$out/eval.json")
{
    echo "# The LRC card's zero-shot table: $run"
    echo
    echo "\`${cmd[*]}\`, $(date -u +%F), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), on $device."
    echo "Per-task numbers (acc, acc_norm, acc_token, standard errors, seconds) are in eval.json and log.txt."
    echo
    echo '```'
    sed -n "/^LRC card's zero-shot table/,\$p" "$out/log.txt"
    echo '```'
} > "$out/README.md"
echo "wrote $out/README.md"
