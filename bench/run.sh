#!/usr/bin/env bash
# Install and run the benchmark CLI (on a machine with no GPU it runs the CPU demo). Args go to the CLI.
source "$(dirname "$0")/setup_env.sh" tqdm matplotlib
exec $PY -m lora_kernels.bench "$@"
