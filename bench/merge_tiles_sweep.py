"""GPU time of the Triton merge / unmerge per tile choice, against a device copy of W, to choose the tiles
(merge._tiles) by measurement. Calls are captured in CUDA graphs, so host time per launch is left out.

python3 bench/merge_tiles_sweep.py [--out sweep.md]   (needs a GPU)

Every configuration is also checked: a merge, its unmerge and a re-merge must give the first merge's bits."""
import argparse

import torch

from lora_kernels.triton import merge as mg

SHAPES = [(4096, 4096, 16), (14336, 4096, 16), (4096, 14336, 16), (5632, 2048, 16), (4096, 4096, 64)]
CANDIDATES = {
    16: [mg.Tiles(16, 256, 16, 4, 3), mg.Tiles(16, 256, 16, 8, 3), mg.Tiles(16, 256, 16, 4, 2),
         mg.Tiles(16, 256, 16, 8, 4), mg.Tiles(16, 512, 16, 8, 3), mg.Tiles(32, 256, 16, 8, 3),
         mg.Tiles(16, 128, 16, 4, 3)],
    64: [mg.Tiles(16, 64, 64, 4, 3), mg.Tiles(16, 128, 64, 4, 3), mg.Tiles(16, 128, 64, 8, 3),
         mg.Tiles(16, 256, 64, 8, 3)],
}
REPS = 20  # calls per graph replay


def _graph_us(fn, reps=REPS, replays=10):
    """GPU µs per call: `reps` calls captured in one CUDA graph, the median of `replays` timed replays."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return sorted(times)[len(times) // 2]


def _one(N, K, r, tiles):
    torch.manual_seed(0)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(r, K, device="cuda") / K**0.5
    b = torch.randn(N, r, device="cuda") / r**0.5
    mg.TILE_OVERRIDE = tiles
    mg._plans.clear()
    try:
        mg.merge_(w, a, b, 2.0, False)
        first = w.clone()
        mg.merge_(w, a, b, 2.0, True)
        mg.merge_(w, a, b, 2.0, False)
        exact = torch.equal(w.view(torch.int16), first.view(torch.int16))
        merge_us = _graph_us(lambda: mg.merge_(w, a, b, 2.0, False))
        unmerge_us = _graph_us(lambda: mg.merge_(w, a, b, 2.0, True))
    finally:
        mg.TILE_OVERRIDE = None
        mg._plans.clear()
    return merge_us, unmerge_us, exact


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    lines = [f"# Triton merge tiles, GPU time under CUDA graphs ({torch.cuda.get_device_name()})", "",
             "| N×K, r | tiles (n, k, r, warps, stages) | merge µs | unmerge µs | pair / copy | re-merge exact |",
             "|---|---|---|---|---|---|"]
    for N, K, r in SHAPES:
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        dst = torch.empty_like(w)
        copy_us = _graph_us(lambda: dst.copy_(w))
        lines.append(f"| {N}×{K}, {r} | copy | {copy_us:.1f} | | 1.000 | |")
        for tiles in CANDIDATES[r]:
            try:
                m_us, u_us, exact = _one(N, K, r, tiles)
                lines.append(f"| {N}×{K}, {r} | {tuple(tiles)} | {m_us:.1f} | {u_us:.1f} | "
                             f"{(m_us + u_us) / 2 / copy_us:.3f} | {exact} |")
            except Exception as e:  # noqa: BLE001 - one failing choice must not lose the others
                lines.append(f"| {N}×{K}, {r} | {tuple(tiles)} | failed: {type(e).__name__}: {str(e)[:80]} | | | |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
