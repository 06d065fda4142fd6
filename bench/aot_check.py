"""Compile every Triton kernel variant for Hopper (sm_90a) without a GPU and report what the compiler made:
whether the GEMMs use wgmma (Hopper tensor cores), registers per thread and spills (ptxas -v); with --sass,
the SASS instructions of the kernel and of its longest loop body (nvdisasm), to compare instruction counts of
two forms of a kernel without a GPU.

    python bench/aot_check.py [--json out.json] [--only NAME] [--sass]   (exit code 1 if any variant fails)

Runs anywhere triton is installed: compilation needs no device. TRITON_INTERPRET must be unset.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lora_kernels.triton import dropout as dr  # noqa: E402
from lora_kernels.triton import fused_linear as fl  # noqa: E402
from lora_kernels.triton import merge as mg  # noqa: E402
from lora_kernels.triton import nf4_tile as nf4_mod  # noqa: E402
from lora_kernels.triton import splitk as sk_mod  # noqa: E402
from lora_kernels.triton import tma_gemm as tma_mod  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
FLOAT_ARGS = {"scale", "keep_scale", "offset"}


# What the JIT specialises at run time on typical shapes: integer arguments equal to 1 become constants
# (unit strides), pointers and integers divisible by 16 carry that fact. Compiling without it would hide the
# vectorised, pipelined loads the kernels really get.
UNIT = {"stride_ak", "stride_bk", "stride_wk",
        "stride_cn", "stride_lr", "stride_rr", "stride_xk", "stride_or", "stride_xc",
        "stride_sr", "stride_oc", "stride_fak"}
ODD = {"R", "threshold", "M_BUCKET", "stride_an", "stride_bn_merge"}


def _specialise(fn, consts, odd=()):
    consts = dict(consts)
    attrs = {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            continue
        if p.name.endswith("_desc"):  # tensor descriptors carry their own shape and alignment
            continue
        if p.name in UNIT and p.name not in odd:
            consts[p.name] = 1
        elif p.name not in FLOAT_ARGS and p.name not in ODD and p.name not in odd:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return consts, attrs


def _signature(fn, ptr_types, constexprs):
    sig = {}
    for p in fn.params:
        name = p.name
        if p.is_constexpr or name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr") or name.endswith("_desc"):
            sig[name] = ptr_types.get(name, ptr_types["*"])
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in constexprs]  # noqa: E501
    if missing:
        raise ValueError(f"constexprs missing: {missing}")
    return sig


def _gemm(dtype, **flags):
    base = dict(HAS_BIAS=True, SCALE_FROM_PTR=False, LOWRANK_DROPOUT=False, MULTI=False, NF4=False, NF4_LAYOUT=0,
                FOLD_XA=False,
                EVEN_K=True,
                DOT_PRECISION="tf32", BLOCK_R=16, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8)
    base.update(flags)
    ptrs = {"*": f"*{dtype}", "l_ptr": "*fp32", "scale_ptr": "*fp32", "seed_ptr": "*i64", "perm_ptr": "*i32",
            "slot_ptr": "*i32", "absmax_ptr": "*fp32", "code_ptr": "*fp32", "fa_ptr": "*fp32"}
    if base["NF4"]:
        ptrs["b_ptr"] = "*u8"
    return fl._gemm_lowrank_kernel, ptrs, base


def variants():
    yield "gemm bf16 128x256 (forward, large M)", *_gemm("bf16"), dict(num_warps=8, num_stages=3)
    # the largest dx tile the pruning keeps with dropout (configs.prune_gemm_configs)
    yield "gemm bf16 dropout-masked LoRA step (dx)", *_gemm("bf16", LOWRANK_DROPOUT=True, HAS_BIAS=False,
                                                            BLOCK_N=128), dict(num_warps=8, num_stages=4)
    yield "gemm bf16 16x64 (decode)", *_gemm("bf16", BLOCK_M=16, BLOCK_N=64, BLOCK_K=128), \
        dict(num_warps=4, num_stages=5)
    yield "gemm bf16 16x64 decode, x·Aᵀ folded in", *_gemm("bf16", FOLD_XA=True, BLOCK_M=16, BLOCK_N=64,
                                                          BLOCK_K=128), dict(num_warps=4, num_stages=5)
    yield "gemm bf16 16x16 decode, x·Aᵀ folded in", *_gemm("bf16", FOLD_XA=True, BLOCK_M=16, BLOCK_N=16,
                                                          BLOCK_K=256), dict(num_warps=4, num_stages=4)
    yield "gemm bf16 multi-adapter", *_gemm("bf16", MULTI=True, SCALE_FROM_PTR=True, BLOCK_M=64, BLOCK_N=128), \
        dict(num_warps=4, num_stages=4)
    yield "gemm bf16 NF4 base", *_gemm("bf16", NF4=True, BLOCK_M=128, BLOCK_N=128), dict(num_warps=8, num_stages=3)
    yield "gemm bf16 NF4 rows (forward)", *_gemm("bf16", NF4=True, NF4_LAYOUT=1, BLOCK_M=128, BLOCK_N=128), \
        dict(num_warps=8, num_stages=3)
    yield "gemm bf16 NF4 rows (dx)", *_gemm("bf16", NF4=True, NF4_LAYOUT=2, BLOCK_M=128, BLOCK_N=128), \
        dict(num_warps=8, num_stages=3)
    yield "gemm bf16 NF4 rows decode", *_gemm("bf16", NF4=True, NF4_LAYOUT=1, BLOCK_M=16, BLOCK_N=64,
                                               BLOCK_K=128), dict(num_warps=4, num_stages=4)
    yield "gemm fp16 r=64 odd K", *_gemm("fp16", EVEN_K=False, BLOCK_R=64), dict(num_warps=8, num_stages=3,
                                                                                  odd=("K", "stride_am", "stride_bn"))
    yield "gemm bf16 r=64 128x256", *_gemm("bf16", BLOCK_R=64), dict(num_warps=8, num_stages=3)
    yield "gemm bf16 r=64 128x128", *_gemm("bf16", BLOCK_R=64, BLOCK_N=128), dict(num_warps=8, num_stages=4)
    yield "gemm fp32 ieee", *_gemm("fp32", DOT_PRECISION="ieee", BLOCK_M=64, BLOCK_N=64, BLOCK_K=32), \
        dict(num_warps=4, num_stages=3)
    sk = dict(SCALE_FROM_PTR=False, DROPOUT=True, MULTI=False, DOT_PRECISION="tf32", BLOCK_M=64, BLOCK_K=64,
              BLOCK_R=16)
    sk_ptrs = {"*": "*bf16", "out_ptr": "*fp32", "scale_ptr": "*fp32", "seed_ptr": "*i64", "perm_ptr": "*i32",
               "slot_ptr": "*i32"}
    yield "skinny x·Aᵀ with dropout", fl._skinny_rank_kernel, sk_ptrs, sk, dict(num_warps=4, num_stages=3)
    yield "skinny multi-adapter", fl._skinny_rank_kernel, sk_ptrs, dict(sk, DROPOUT=False, MULTI=True), \
        dict(num_warps=4, num_stages=3)
    yield "skinny r=256", fl._skinny_rank_kernel, sk_ptrs, dict(sk, BLOCK_R=256, BLOCK_K=32), \
        dict(num_warps=8, num_stages=3)
    yield "skinny r=256, float32 adapters", fl._skinny_rank_kernel, dict(sk_ptrs, rt_ptr="*fp32"), \
        dict(sk, BLOCK_R=256, BLOCK_K=32), dict(num_warps=8, num_stages=3)
    rr = dict(SCALE_FROM_PTR=False, DROPOUT=True, COLSUM=True, DOT_PRECISION="tf32", BLOCK_M=64, BLOCK_C=64,
              BLOCK_R=16)
    rr_ptrs = {"*": "*bf16", "s_ptr": "*fp32", "out_ptr": "*fp32", "colsum_ptr": "*fp32", "scale_ptr": "*fp32",
               "seed_ptr": "*i64"}
    yield "reduce rows (dA/dB, dbias)", fl._reduce_rows_kernel, rr_ptrs, rr, dict(num_warps=4, num_stages=3)

    def merge_tiles(r):
        t = mg._tiles(r)
        return dict(BLOCK_N=t.block_n, BLOCK_K=t.block_k, BLOCK_R=t.block_r, STAGES=t.stages), \
            dict(num_warps=t.warps)

    def merge(r, **flags):
        consts, opts = merge_tiles(r)
        precision = "bf16x6" if r <= 64 else "tf32x3"  # merge._precision's choice for float32 adapters
        return {"*": "*fp32", "w_ptr": "*bf16"}, dict(m, PRECISION=precision, **consts, **flags), opts
    m = dict(UNMERGE=True, INT_TY=tl.int16, GROUPED=False, W_VEC=1, A_VEC=1, B_VEC=1, HALF_TY=tl.bfloat16)
    yield "merge bf16 unmerge", mg._merge_kernel, *merge(16)
    yield "merge bf16 merge", mg._merge_kernel, *merge(16, UNMERGE=False)
    for r in (32, 64, 128, 256):
        yield f"merge bf16 unmerge r={r}", mg._merge_kernel, *merge(r)
    yield "merge bf16 unmerge, bf16 adapters", mg._merge_kernel, {"*": "*bf16"}, \
        dict(merge(16)[1], PRECISION="native"), merge_tiles(16)[1]
    sk = dict(NF4=False, DOT_PRECISION="tf32", BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, BLOCK_R=16)
    sk_ptrs = {"*": "*bf16", "part_ptr": "*fp32", "xa_part_ptr": "*fp32", "a_ptr": "*fp32", "absmax_ptr": "*fp32",
               "code_ptr": "*fp32"}
    yield "split-K decode partials bf16", sk_mod._splitk_partial_kernel, sk_ptrs, sk, dict(num_warps=4, num_stages=3)
    yield "split-K decode partials NF4", sk_mod._splitk_partial_kernel, dict(sk_ptrs, w_ptr="*u8"), \
        dict(sk, NF4=True), dict(num_warps=4, num_stages=3)
    for rows in (1, 2, 4):
        yield f"NF4 decode partials by multiply-adds, {rows} row(s)", sk_mod._nf4_gemv_partial_kernel, \
            dict(sk_ptrs, w_ptr="*u8"), dict(ROWS=rows, BLOCK_N=32, BLOCK_K=max(64, 128 // rows), BLOCK_R=16), \
            dict(num_warps=4, num_stages=3)
    red = dict(HAS_BIAS=True, SCALE_FROM_PTR=False, DOT_PRECISION="tf32", BLOCK_M=16, BLOCK_N=64, BLOCK_R=16)
    yield "split-K decode reduce + LoRA + bias", sk_mod._splitk_reduce_kernel, \
        {"*": "*fp32", "y_ptr": "*bf16", "bias_ptr": "*bf16"}, dict(red, BLOCK_N=32), dict(num_warps=8)
    yield "split-K decode reduce, float32 without TF32, 64 rows, rank 128", sk_mod._splitk_reduce_kernel, \
        {"*": "*fp32"}, dict(red, BLOCK_M=64, BLOCK_N=32, BLOCK_R=128, DOT_PRECISION="ieee"), dict(num_warps=8)
    yield "split-K decode in one launch (partials, last program reduces)", sk_mod._splitk_fused_kernel, \
        dict(sk_ptrs, count_ptr="*i32", b_ptr="*fp32", bias_ptr="*bf16", scale_ptr="*fp32", xa_ptr="*fp32"), \
        dict(red, BLOCK_K=128), dict(num_warps=4, num_stages=3)
    yield "NF4 dequantise whole W", nf4_mod._dequantize_kernel, {"*": "*fp32", "b_ptr": "*u8", "out_ptr": "*bf16"}, \
        dict(BLOCK_N=32, BLOCK_K=256), dict(num_warps=4)
    tma = dict(B_ROWS_ARE_N=True, HAS_BIAS=True, SCALE_FROM_PTR=False, LOWRANK_DROPOUT=False, DOT_PRECISION="tf32",
               BLOCK_R=16, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, FLATTEN=False)
    tma_ptrs = {"*": "*fp32", "a_desc": "tensordesc<bf16[128, 64]>", "b_desc": "tensordesc<bf16[128, 64]>",
                "c_ptr": "*bf16", "bias_ptr": "*bf16", "seed_ptr": "*i64"}
    yield "TMA persistent gemm 128x128 (forward)", tma_mod._tma_lowrank_kernel, tma_ptrs, tma, \
        dict(num_warps=8, num_stages=4)
    wide = dict(tma_ptrs, b_desc="tensordesc<bf16[256, 64]>")
    yield "TMA persistent gemm 128x256 (forward)", tma_mod._tma_lowrank_kernel, wide, dict(tma, BLOCK_N=256), \
        dict(num_warps=8, num_stages=3)
    yield "TMA persistent gemm 128x256 flattened", tma_mod._tma_lowrank_kernel, wide, \
        dict(tma, BLOCK_N=256, FLATTEN=True), dict(num_warps=8, num_stages=3)
    yield "TMA persistent gemm 128x128 (dx, dropout)", tma_mod._tma_lowrank_kernel, \
        dict(tma_ptrs, b_desc="tensordesc<bf16[64, 128]>"), dict(tma, B_ROWS_ARE_N=False, LOWRANK_DROPOUT=True), \
        dict(num_warps=8, num_stages=4)
    yield "dropout mask applied (composite forward)", dr._apply_kernel, \
        {"*": "*bf16", "seed_ptr": "*i64"}, dict(BLOCK_M=16, BLOCK_K=256), dict(num_warps=4)
    yield "masked low-rank backward (composite)", dr._lowrank_backward_kernel, \
        {"*": "*bf16", "da_ptr": "*fp32", "seed_ptr": "*i64"}, \
        dict(HAS_DX=True, DOT_PRECISION="tf32", BLOCK_M=32, BLOCK_K=64, BLOCK_R=16), dict(num_warps=4, odd=("R",))
    yield "masked low-rank backward, float32 (composite)", dr._lowrank_backward_kernel, \
        {"*": "*fp32", "seed_ptr": "*i64"}, \
        dict(HAS_DX=True, DOT_PRECISION="ieee", BLOCK_M=32, BLOCK_K=32, BLOCK_R=16), dict(num_warps=4, odd=("R",))
    yield "NF4 double-quantised absmax decode", nf4_mod._decode_absmax_kernel, {"*": "*fp32", "q_ptr": "*u8"}, \
        dict(BLOCKSIZE2=256, BLOCK=1024), dict(num_warps=4, enable_fp_fusion=False)
    offs = {"*": "*fp32", "w_ptr": "*bf16", "w_offs_ptr": "*i64", "a_offs_ptr": "*i64", "b_offs_ptr": "*i64"}
    _, g, g_opts = merge(16, UNMERGE=False, GROUPED=True, W_VEC=8, A_VEC=4, B_VEC=4)
    yield "merge bf16 grouped (merge_model)", mg._merge_kernel, offs, g, g_opts


def _ptxas_usage(ptx: str):
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        return None, None
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    out = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
    os.unlink(f.name)
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    return (int(regs.group(1)) if regs else None), (int(spill.group(1)) if spill else None)


def _sass_counts(cubin: bytes):
    """(instructions in the kernel, instructions in its longest loop body), from nvdisasm; a loop body is the
    span from a backward branch's target to the branch."""
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    if not os.path.exists(nvdisasm):
        return None, None
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    out = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    addrs, loop = [], 0
    for line in out.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        addrs.append(addr)
        target = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", m.group(2))
        label = re.search(r"\.L_x_(\d+)", m.group(2)) if "BRA" in m.group(2) else None
        if target and target.group(1):
            start = int(target.group(1), 16)
            if start < addr:
                loop = max(loop, (addr - start) // 16 + 1)
        elif label:
            labels = _labels(out)
            start = labels.get(label.group(1))
            if start is not None and start < addr:
                loop = max(loop, (addr - start) // 16 + 1)
    return len(addrs), loop


def _labels(text: str):
    """nvdisasm's .L_x_N labels -> the address of the instruction after each."""
    labels, pending = {}, []
    for line in text.splitlines():
        m = re.match(r"\.L_x_(\d+):", line.strip())
        if m:
            pending.append(m.group(1))
            continue
        a = re.match(r"\s*/\*([0-9a-f]{4,})\*/", line)
        if a and pending:
            for name in pending:
                labels[name] = int(a.group(1), 16)
            pending = []
    return labels


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--only", default="", help="compile only the variants whose name contains this")
    ap.add_argument("--sass", action="store_true", help="also count SASS instructions (kernel, longest loop)")
    args = ap.parse_args()
    results, failed = [], 0
    for name, fn, ptrs, consts, opts in variants():
        if args.only not in name:
            continue
        row = dict(kernel=name)
        try:
            consts, attrs = _specialise(fn, consts, odd=opts.pop("odd", ()))
            src = ASTSource(fn=fn, signature=_signature(fn, ptrs, consts), constexprs=consts, attrs=attrs)
            k = triton.compile(src, target=TARGET, options=opts)
            ptx = k.asm["ptx"]
            row.update(ok=True, wgmma="wgmma" in ptx, cp_async=("cp.async" in ptx), shared=k.metadata.shared)
            row["regs"], row["spill_bytes"] = _ptxas_usage(ptx)
            if args.sass:
                row["sass"], row["sass_loop"] = _sass_counts(k.asm["cubin"])
        except Exception as e:  # noqa: BLE001 - report every variant, fail at the end
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
            failed += 1
        results.append(row)
        print(f"{'ok  ' if row['ok'] else 'FAIL'} {name:42s} " + (
            f"wgmma={row['wgmma']!s:5s} cp.async={row['cp_async']!s:5s} regs={row['regs']} "
            f"spills={row['spill_bytes']} smem={row['shared']}"
            + (f" sass={row['sass']} loop={row['sass_loop']}" if args.sass else "")
            if row["ok"] else row["error"]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(target="sm_90a", triton=triton.__version__, kernels=results), f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
