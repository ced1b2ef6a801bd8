#!/usr/bin/env bash
# Set up a fresh machine and run the whole chain on built-in demo data:  bash scripts/demo.sh
source "$(dirname "$0")/setup.sh"
DEMO=${DEMO:-data/demo}
rm -rf "$DEMO"   # the demo owns this folder; your own data/HMDB51 is never touched
set -x
elr-ingest make-demo "$DEMO/HMDB51" --videos-per-class 4
elr-ingest build-shards "$DEMO/HMDB51"
elr-ingest verify "$DEMO/HMDB51-shards" --source "$DEMO/HMDB51"
elr-ingest info "$DEMO/HMDB51-shards"
