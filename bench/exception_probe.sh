#!/usr/bin/env bash
# Does an error raised inside the C++ extension (a TORCH_CHECK) reach Python as a RuntimeError?
# Prints the toolchain next to the answer; under gdb when it is there, so a crash comes with a backtrace.
echo "== exception probe"; g++ --version | head -1; gcc -dumpfullversion
python3 -c "import torch; print('cxx11abi', torch.compiled_with_cxx11_abi()); print(torch.__config__.show())" | head -12
so=$(ls lora_kernels/_C*.so | head -1); echo "$so"; ldd "$so" | grep -E "stdc|gcc_s|c10|torch_cpu" 
cat > /tmp/exc_probe.py <<'PY'
import sys, torch, lora_kernels._C
d = sys.argv[1]
w = torch.zeros(4, 4, device=d)
try:
    torch.ops.lora_kernels.merge_weight_(w, torch.zeros(2, 5, device=d), torch.zeros(4, 2, device=d), 1.0, False)
except RuntimeError as e:
    print(d, "raised fine:", str(e).splitlines()[0][:100])
PY
for dev in cpu cuda; do
  python3 /tmp/exc_probe.py $dev; echo "$dev rc=$?"
done
if command -v gdb >/dev/null; then
  gdb -q -batch -ex run -ex bt --args python3 /tmp/exc_probe.py cpu 2>&1 | grep -v "^\[" | tail -40
fi
