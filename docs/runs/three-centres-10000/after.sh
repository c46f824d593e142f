#!/bin/bash
# After the three-centre fit: head, operating point, scores. Run from /work/main with the venv active.
set -euo pipefail
R=/work/runs; M=$R/3c-10000/model; H=$R/3c-presence; OLD=syndiff_stream/weights/compact16-stem4-kvasir-clinicdb
DATA="--data kvasir=../shared/data/kvasir-seg-train --data clinicdb=../shared/data/cvc-clinicdb-train --data neopolyp=../shared/data/neopolyp-train"
PF="--polyp-free polyp-free-val=../shared/data/polyp-free-val"
date
syndiff-train eval --model $M $DATA --against $OLD $PF --per-image --json --threads 2 > $R/eval_backbone_vs_old.json
date
syndiff-train presence-head --model $M --out $H --steps 400 --threads 2 --no-progress > $R/presence.log 2>&1
date
python docs/runs/loco/presence/frame_scores.py $H ../shared/data/neopolyp-train $R/frame_scores_neopolyp_all.json > /dev/null
syndiff-train operating-point --model $H $DATA $PF --max-alarm 0.05 --write --json --threads 2 > $R/op_head.json
date
syndiff-train eval --model $H $DATA $PF --json --threads 2 > $R/eval_head.json
syndiff-train eval-video ../shared/data/polyp-free-val --model $H --fps 5 --split all --json > $R/video_pf_head.json
syndiff-train eval-video ../shared/data/cvc-clinicdb-train --model $H --fps 25 --json > $R/video_clinicdb_head.json
date
syndiff-stream bench --model $H --backend onnx --frames 100 --compare-model $OLD --json > $R/bench_compare.json 2> $R/bench_compare.err
syndiff-stream bench --model $H --backend onnx --threads 1 --frames 100 --compare-model $OLD --json > $R/bench_compare_t1.json 2> $R/bench_compare_t1.err
date
