#!/usr/bin/env bash
# Set up a fresh machine and run the test suite:  bash scripts/test.sh [pytest args]
source "$(dirname "$0")/setup.sh"
exec python -m pytest -q -p no:cacheprovider "$@"
