#!/usr/bin/env bash
# Install and run the test suite (GPU tests are skipped where there is no GPU). Args go to pytest.
source "$(dirname "$0")/../bench/setup_env.sh" pytest hypothesis safetensors peft transformers bitsandbytes
exec $PY -m pytest -q "$@"
