"""The dropout mask as a pure function of (seed, row, col); mirrors reference.dropout_keep bit for bit."""
import triton
import triton.language as tl


@triton.jit
def hash32(x):
    # lowbias32; x is uint32 and multiplication wraps mod 2**32.
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def load_seed(seed_ptr):
    return (tl.load(seed_ptr) & 0x7FFFFFFF).to(tl.uint32)


@triton.jit
def keep_mask(seed, rows, cols, threshold):
    """Boolean (len(rows), len(cols)) tile: True where the element survives dropout."""
    row_h = hash32(rows.to(tl.uint32) ^ seed)
    h = hash32(row_h[:, None] ^ cols.to(tl.uint32)[None, :])
    return (h >> 8).to(tl.int32) >= threshold
