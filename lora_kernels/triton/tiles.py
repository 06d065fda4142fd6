"""Pieces of the low-rank GEMMs shared by the pointer-fed kernel (fused_linear) and the TMA-fed one (tma_gemm)."""
import triton
import triton.language as tl


@triton.jit
def lowrank_dot(acc, l_ptr, r_ptr, rows, rn, R, stride_lm, stride_lr, stride_rr, stride_rn, row_scale,
                DT: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc += (row_scale ⊙ L[rows, :R]) · Rt[:R, rn]: the extra K step(s) that carry the LoRA term."""
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        lt = tl.load(l_ptr + rows[:, None] * stride_lm + rr[None, :] * stride_lr, mask=rr[None, :] < R, other=0.0)
        lt = (lt.to(tl.float32) * row_scale[:, None]).to(DT)
        rt = tl.load(r_ptr + rr[:, None] * stride_rr + rn[None, :] * stride_rn, mask=rr[:, None] < R, other=0.0)
        acc = tl.dot(lt, rt.to(DT), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def output_tile(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Tile `tile` of the output in grouped order (GROUP_M row blocks share each column block of B while it
    sits in L2): its block indices, row and column offsets, and those offsets wrapped into range (every load
    stays in bounds; the store is masked instead)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (tile // per_group) * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((tile % per_group) % group_rows)
    pid_n = (tile % per_group) // group_rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_m, pid_n, offs_m, offs_n, (offs_m % M).to(tl.int64), (offs_n % N).to(tl.int64)
