#!/usr/bin/env bash
# Set up a fresh machine and run the whole chain on built-in demo data:  bash scripts/demo.sh
# make-demo -> build-shards -> verify --source -> 2-process DDP training -> 2 evaluation jobs -> merge,
# then the front-end from videos: make-demo-videos -> extract-features -> build-shards -> train -> eval,
# and the seed's step 2 in full: build-clips -> elr-train-c3d (fine-tune C3D) -> extract-features with it
source "$(dirname "$0")/setup.sh"
DEMO=${DEMO:-data/demo}
rm -rf "$DEMO"   # the demo owns this folder; your own data/HMDB51 is never touched
step() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }

step "1/8 synthetic HMDB51-shaped C3D features (51 classes, dim 4096) in the seed's layout"
elr-ingest make-demo "$DEMO/HMDB51" --videos-per-class 4
step "2/8 build WebDataset + Zarr shards"
elr-ingest build-shards "$DEMO/HMDB51"
elr-ingest info "$DEMO/HMDB51-shards"
step "3/8 verify the shards against the source, array by array"
elr-ingest verify "$DEMO/HMDB51-shards" --source "$DEMO/HMDB51"
step "4/8 train the coupled two-stream GRU: 2 DDP processes (gloo on CPU, NCCL on GPUs)"
# hidden 128 keeps the demo to a few minutes on 2 CPU cores; the seed's default is 512
python train/ddp.py --nproc 2 --shards "$DEMO/HMDB51-shards" --out "$DEMO/run" \
  --epochs 6 --test-every 3 --hidden 128 --batch-size 64
step "5/8 evaluate the checkpoint as 2 independent jobs (as a SLURM array would)"
for job in 0 1; do
  elr-eval run --shards "$DEMO/HMDB51-shards" --checkpoint "$DEMO/run/last.pt" \
    --num-jobs 2 --job-index $job --out "$DEMO/eval" &
done
wait
step "6/8 merge the parts"
elr-eval merge "$DEMO/eval"
echo "training curves: $DEMO/run/curves.png   metrics: $DEMO/run/metrics.jsonl"

step "7/8 from videos: synthetic clips -> optical flow + C3D features (random weights, 16x16 crops) -> shards -> train -> eval"
# the real thing: elr-ingest extract-features hmdb51_org --splits testTrainMulti_7030_splits --c3d-weights c3d.pickle
V="$DEMO/from-videos"
elr-ingest make-demo-videos "$V" --classes 4 --train 12 --test 6 --size 48x64 --min-frames 16 --max-frames 24
elr-ingest extract-features "$V/videos" --splits "$V/splits" --out "$V/HMDB51" --random-c3d 0 --crop-size 16 --flow-bound 4
elr-ingest build-shards "$V/HMDB51" -q
python train/ddp.py --nproc 2 --shards "$V/HMDB51-shards" --out "$V/run" --epochs 6 --hidden 64 --batch-size 16 -q
elr-eval run --shards "$V/HMDB51-shards" --checkpoint "$V/run/last.pt" --out "$V/eval"

step "8/8 fine-tune C3D on clips of those videos (the seed's step 2), then extract features with it"
# the real thing: elr-train-c3d --clips data/HMDB51-clips --streams hr_rgb,lr_rgb --init c3d.pickle
elr-ingest build-clips "$V/videos" --splits "$V/splits" --out "$V/clips" --crop-size 16 --flow-bound 4 -q
elr-ingest verify "$V/clips"
# --no-flip: a mirror turns the demo's "slide right" into its "slide left"
elr-train-c3d --clips "$V/clips" --random-c3d 0 --out "$V/c3d-rgb" --epochs 2 --batch-size 8 --no-flip -q
# from the clips build-clips stored: no video decoded, no flow computed again
elr-ingest extract-features --clips "$V/clips" --out "$V/HMDB51-tuned" --c3d-weights "$V/c3d-rgb/best.pt"
echo "C3D fine-tuning curves: $V/c3d-rgb/curves.png   metrics: $V/c3d-rgb/metrics.jsonl"
