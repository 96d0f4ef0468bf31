#!/usr/bin/env bash
# The main job: build and install the engine (scripts/setup.sh), then run a real local Ray job that passes tensors
# between tasks and actors with tenso on and off and prints what moved and how fast (integrations/ray/job.py),
# then the codec demonstration (encode, stream and decode real tensors between processes, with a comparison table).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
printf '\n==> Ray job (integrations/ray/job.py)\n'
.venv/bin/python integrations/ray/job.py "$@"
printf '\n==> codec demonstration (integrations/demo/demo.py)\n'
.venv/bin/python integrations/demo/demo.py
