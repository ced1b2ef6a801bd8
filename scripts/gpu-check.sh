#!/usr/bin/env bash
# The CUDA paths and the GPU rows of BENCHMARKS.md, in one short run on a machine with a GPU:
#   bash scripts/gpu-check.sh [OUT]        (logs and timings under OUT, default gpu-check/)
# Each step is bounded by `timeout` so that one slow step cannot eat the others' time. On a machine
# without network access, wheels of the missing dependencies can wait in .whl/ (installed first).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${1:-gpu-check}
DEV=${DEV:-cuda}   # DEV=cpu: a dry run of the same steps here
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ! python3 -c "import webdataset, zarr, dask.distributed, av, aiohttp" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
command -v elr-ingest >/dev/null || python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
  || { echo "pip install -e . failed"; exit 1; }
step() { local name=$1 secs=$2; shift 2; echo; echo "== $name (at most ${secs}s)"; local t0=$SECONDS
  timeout "$secs" "$@" 2>&1 | tee "$OUT/$name.log"; echo "== $name: exit ${PIPESTATUS[0]} in $((SECONDS - t0)) s"; }
nvidia-smi -L 2>/dev/null; python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"

step zarr-bytes 60 python3 -m pytest -q -p no:cacheprovider tests/test_zarrio.py   # the installed zarr's own bytes
D=/tmp/gpu-demo
step demo-data 60 bash -c "rm -rf $D && elr-ingest make-demo $D/HMDB51 --videos-per-class 4 && elr-ingest build-shards $D/HMDB51 -q"
# the training loop's CUDA path: pinned rings filled by 2 workers, the side-stream prefetch, bf16
step train-bf16 120 torchrun --nproc-per-node 1 train/ddp.py --shards $D/HMDB51-shards --out $D/run \
  --epochs 3 --test-every 3 --amp bf16 --device $DEV
step eval-cuda 60 elr-eval run --shards $D/HMDB51-shards --checkpoint $D/run/last.pt --out $D/eval --device $DEV
# C3D on the GPU: extract-features from real encoded videos, in-process and on a GPU dask worker
V=$D/videos
step extract-cuda 150 bash -c "elr-ingest make-demo-videos $V --classes 4 --train 6 --test 3 --size 120x160 --min-frames 32 --max-frames 48 \
  && elr-ingest extract-features $V/videos --splits $V/splits --out $V/F1 --random-c3d 0 --device $DEV \
  && elr-ingest extract-features $V/videos --splits $V/splits --out $V/F2 --random-c3d 0 --c3d-workers 1 \
  && diff -r -q -x '*.json' $V/F1 $V/F2 && echo 'in-process and GPU-worker trees: identical'"
# the seed's step 2 on the GPU: clips built, C3D fine-tuned in bf16 with channels_last_3d, its best.pt extracting
step c3d-finetune-cuda 150 bash -c "elr-ingest build-clips $V/videos --splits $V/splits --out $V/clips --crop-size 32 -q \
  && elr-train-c3d --clips $V/clips --random-c3d 0 --out $V/c3d --epochs 2 --batch-size 8 --device $DEV -q \
  && elr-ingest extract-features $V/videos --splits $V/splits --out $V/F3 --c3d-weights $V/c3d/best.pt --device $DEV -q \
  && elr-ingest extract-features --clips $V/clips --out $V/F4 --c3d-weights $V/c3d/best.pt --device $DEV -q"
[ "$DEV" = cpu ] && exit 0
step bench-c3d-train 150 python3 -m bench.c3d_train --device $DEV --batch 16 --steps 10 --loader-workers 4
step bench-train 150 python3 -m bench.train --device $DEV --amp bf16 --steps 60 --rounds 3
# every core but two prepares clips for C3D (decode, resize, optical flow): the GPU waits on them
step bench-features 150 python3 -m bench.features --device $DEV --workers $(( $(nproc) > 3 ? $(nproc) - 2 : 1 )) --jobs --rounds 1
# issue 23's targets where cores are to spare (on the 2-core development machine the server takes one of
# two): the first epoch from an HTTP server through an empty cache x fsspec cat; cold reads x the disk
step bench-remote 150 python3 -m bench.remote --servers http --rounds 2
step bench-cold 120 python3 -m bench.peers --loaders ours --rounds 3
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
