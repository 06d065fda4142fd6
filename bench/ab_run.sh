#!/usr/bin/env bash
# The same command on this tree and on copies of it with patches applied, one after another on one GPU, so
# that a branch is measured against main on the same machine in the same run:
#
#   git diff main BRANCH > ab/BRANCH.patch            (in a checkout of main; copy ab/ with the tree)
#   bash bench/ab_run.sh "python3 bench/decode_graphs.py" ab/*.patch      (on the GPU machine)
#
# Output of each run in $OUT/ab-<label>.txt (label: "main" or the patch's file name); the command runs in
# the tree's root with PYTHONPATH set to it, so `import lora_kernels` takes that tree's code (built
# extensions included: the copies keep this tree's lora_kernels/*.so, except where a patch changes csrc/, see
# below). ROUNDS=2 alternates the trees twice. BASE_LABEL names this tree in the output (default "main"; when
# the checkout is a branch and the patch leads back to main, say BASE_LABEL=branch).
set -uo pipefail
OUT=${OUT:-.gpu_out}; mkdir -p "$OUT"
cmd=$1; shift
root=$(pwd)
trees=("${BASE_LABEL:-main}:$root")
for patch in "$@"; do
  label=$(basename "$patch" .patch)
  copy=/tmp/ab-$label
  # the tree without virtual environments, build trees and git's store (a .venv here is gigabytes)
  rm -rf "$copy" && mkdir -p "$copy"
  tar -C "$root" --exclude=./.venv --exclude=./build --exclude=./.git --exclude=./.gpu_out --exclude='*/__pycache__' \
    -cf - . | tar -C "$copy" -xf -
  if ! (cd "$copy" && patch -p1 -s < "$root/$patch"); then
    echo "ab_run: $patch does not apply; skipped" | tee -a "$OUT/ab-$label.txt"
    continue
  fi
  # A patch that changes csrc/ needs its own extension: ab/<label>.so where one was built beforehand for this
  # machine's Python, else a build in the copy (minutes).
  if grep -q '^diff --git a/csrc/' "$root/$patch"; then
    so=lora_kernels/_C$(python3 -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
    if [[ -f "$root/ab/$label.so" ]]; then
      cp "$root/ab/$label.so" "$copy/$so"
    else
      (cd "$copy" && LORA_KERNELS_ARCHS="${LORA_KERNELS_ARCHS:-90a}" python3 setup.py build_ext --inplace \
        > "$OUT/ab-$label-build.log" 2>&1) || echo "ab_run: $label: extension build failed" | tee -a "$OUT/ab-$label.txt"
    fi
  fi
  trees+=("$label:$copy")
done
for ((round = 1; round <= ${ROUNDS:-1}; round++)); do
  for entry in "${trees[@]}"; do
    label=${entry%%:*} dir=${entry#*:}
    echo "== round $round, $label: $cmd" >> "$OUT/ab-$label.txt"
    (cd "$dir" && PYTHONPATH=$dir timeout "${AB_TIMEOUT:-300}" bash -c "$cmd") >> "$OUT/ab-$label.txt" 2>&1
    echo "== exit $?" >> "$OUT/ab-$label.txt"
  done
done
