"""Results files: long-format JSONL, a markdown table and a PNG plot, side by side in bench/results/."""
from __future__ import annotations

import json
import os
import re
from collections import OrderedDict


# Providers whose activation memory (kept by forward for backward) the per-op table shows: the dropout target
# holds for what `auto` runs, so our backends all appear.
ACT_PROVIDERS = ("base", "peft", "addmm", "triton", "cuda", "auto")

def stem(meta) -> str:
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", meta["gpu"]).strip("-").lower()
    sha = re.sub(r"[^A-Za-z0-9]+", "-", meta["sha"])  # file names of letters, digits and dashes
    return f"{gpu}-{meta['time'][:10].replace('-', '')}-{sha}"


def write_jsonl(rows, path):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def markdown(rows, meta) -> str:
    """One line per (mode, shape, r, dropout): each provider's ratio to the base, and ours next to the floor."""
    order = ["base", "copy", "peft", "peft_compile", "addmm", "triton", "triton_pointers", "triton_tma", "cuda", "auto"]
    present = [p for p in order if any(r["provider"] == p for r in rows)]
    groups = OrderedDict()
    for r in rows:
        if r["mode"] in ("multi", "multi_train", "e2e", "nf4", "merge_model"):
            continue
        groups.setdefault((r["mode"], r["M"], r["K"], r["N"], r["r"], r["dropout"]), {})[r["provider"]] = r
    out = [f"GPU {meta['gpu']} · torch {meta['torch']} · triton {meta['triton']} · git {meta['sha']} · "
           f"{meta['time']} · measured ceilings: copy {meta['copy_tbps']:.2f} TB/s, "
           f"bf16 matmul {meta['matmul_tflops']:.0f} TFLOP/s", "",
           "Each cell: time / time of the first column (cuBLAS x@Wᵀ, or a device copy of W for merge, where "
           "a cell is (merge + unmerge) / 2), "
           "median of do_bench (forward and train rows: the best of 3 rounds in which a row's providers take "
           "turns). `floor` is max(FLOPs/peak, bytes/bandwidth) over the base time; "
           "`ours/floor` is the best of our backends over the floor. act = activation MiB kept by forward.", "",
           "| mode | M×K×N | r | p | base ms | " + " | ".join(present) + " | floor | ours/floor | act MiB (" +
           ", ".join(p for p in present if p in ACT_PROVIDERS) + ") |",
           "|" + "---|" * (len(present) + 8)]
    slower = []  # rows where what users get by default loses to the plain composite
    for (mode, M, K, N, rank, p), by in groups.items():
        base = by.get("base") or by.get("copy")
        if base is None:
            continue
        cells = [f"{by[q]['ratio']:.3f}" if q in by and by[q]["ratio"] is not None else "–" for q in present]
        ours = [by[q]["p50_ms"] for q in ("triton", "cuda") if q in by]
        fl = base["floor_ms"]
        acts = ", ".join(f"{by[q]['act_mib']:.0f}" if q in by and by[q].get("act_mib") is not None else "–"
                         for q in present if q in ACT_PROVIDERS) if any(
                             by[q].get("act_mib") is not None for q in by) else ""
        shape = f"{K}×{N}" if mode == "merge" else f"{M}×{K}×{N}"
        out.append(f"| {mode} | {shape} | {rank} | {p:g} | {base['p50_ms']:.4f} | " + " | ".join(cells) +
                   f" | {fl / base['p50_ms']:.3f} | " + (f"{min(ours) / fl:.2f}" if ours else "–") +
                   f" | {acts} |")
        if "auto" in by and "addmm" in by and by["auto"]["p50_ms"] > by["addmm"]["p50_ms"]:
            auto, addmm = by["auto"], by["addmm"]
            # beyond the spread: auto's 20th percentile above addmm's 80th, so noise alone cannot explain it
            beyond = auto.get("p20_ms") is not None and addmm.get("p80_ms") is not None and \
                auto["p20_ms"] > addmm["p80_ms"]
            slower.append(f"{mode} {shape} p={p:g} ({auto['p50_ms'] / addmm['p50_ms']:.3f}×"
                          f"{', beyond the p20-p80 spread' if beyond else ', within the spread'})")
    if any(r["provider"] == "auto" for r in rows) and any(r["provider"] == "addmm" for r in rows):
        out += ["", "`auto` slower than `addmm` (median): " + ("; ".join(slower) if slower else "at no row") + "."]
    multi = [r for r in rows if r["mode"] in ("multi", "multi_train")]
    if multi:
        out += ["", "Mixed-adapter batches (K×N = " + f"{multi[0]['K']}×{multi[0]['N']}, r={multi[0]['r']}): "
                "time / cuBLAS x@Wᵀ of the same rows (`*_train`: forward + backward over base forward + dx); "
                "`vs one adapter` = our time over our time for the same rows on a single adapter.", "",
                "| rows | adapters | provider | ms | ratio | vs one adapter |", "|---|---|---|---|---|---|"]
        for r in multi:
            v = f"{r['ratio_vs_one_adapter']:.3f}" if r.get("ratio_vs_one_adapter") else "–"
            out.append(f"| {r['M']} | {r['adapters']} | {r['provider']} | {r['p50_ms']:.4f} | {r['ratio']:.3f} | {v} |")
    mm = [r for r in rows if r["mode"] == "merge_model"]
    if mm:
        out += ["", f"Whole-model merge ({mm[0]['M']} Llama-2-7B-shaped linears, r={mm[0]['r']}): "
                "(merge + unmerge) / 2 over the time to copy every adapted weight once.", "",
                "| provider | ms | ratio to copy |", "|---|---|---|"]
        out += [f"| {r['provider']} | {r['p50_ms']:.3f} | {r['ratio']:.3f} |" for r in mm]
    q4 = [r for r in rows if r["mode"] == "nf4"]
    if q4:
        out += ["", "4-bit NF4 base (bf16 activations): time / bf16 cuBLAS x@Wᵀ of the same shape.", "",
                "| M×K×N | provider | ms | ratio | weight bytes/param |", "|---|---|---|---|---|"]
        for r in q4:
            out.append(f"| {r['M']}×{r['K']}×{r['N']} | {r['provider']} | {r['p50_ms']:.4f} | {r['ratio']:.3f} | "
                       f"{r['weight_bytes_per_param']:.3f} |")
    e2e = [r for r in rows if r["mode"] == "e2e"]
    if e2e:
        first = e2e[0]["provider"]
        out += ["", "End-to-end LoRA fine-tune step (TinyLlama shape, bf16, batch 2×2048, r=16, dropout 0.05, AdamW; "
                "qlora_*: the target linears in bitsandbytes NF4): wall time per step (median over interleaved "
                "rounds: every provider runs a few steps in turn, so a slow spell of the host falls on all alike), "
                f"the speed-up over {first} and its range over the rounds, and activation memory kept by the forward.",
                "", f"| provider | step ms | tokens/s | speed-up vs {first} (per-round range) | activations MiB | "
                "peak MiB | graph breaks | graphs (new in timed rounds) | recompiles in timed rounds |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in e2e:
            spread = (f" ({r['speedup_min']:.2f}–{r['speedup_max']:.2f})" if "speedup_min" in r else "")
            out.append(f"| {r['provider']} | {r['p50_ms']:.1f} | {r.get('tokens_per_s', 0):.0f} | "
                       f"{1 / r['ratio']:.3f}{spread} | "
                       f"{r['act_mib']:.0f} | {r.get('peak_mib', 0):.0f} | {r.get('graph_breaks', '–')} | "
                       f"{r.get('graphs', '–')} ({r.get('graphs_after_warmup', '–')}) | {r.get('recompiles', '–')} |")
    return "\n".join(out) + "\n"


def pyplot():
    """matplotlib.pyplot on the file-only backend, or None where matplotlib is missing (plots are optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except Exception:  # noqa: BLE001
        return None


def save(fig, path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def plot(rows, path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fwd = [r for r in rows if r["mode"] == "forward" and r["provider"] != "base" and r["ratio"]]
    labels = list(OrderedDict.fromkeys(f"{r['M']}×{r['K']}×{r['N']} r{r['r']}" for r in fwd))
    provs = list(OrderedDict.fromkeys(r["provider"] for r in fwd))
    if not labels:
        return False
    fig, ax = plt.subplots(figsize=(max(8, len(labels) * 0.6), 5))
    width = 0.8 / max(len(provs), 1)
    for i, p in enumerate(provs):
        vals = {f"{r['M']}×{r['K']}×{r['N']} r{r['r']}": r["ratio"] for r in fwd if r["provider"] == p}
        ax.bar([j + i * width for j in range(len(labels))], [vals.get(lab, 0) for lab in labels], width, label=p)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 for j in range(len(labels))])
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("time / cuBLAS x@Wᵀ (lower is better)")
    ax.set_title("LoRA linear forward")
    ax.legend()
    return save(fig, path)


def write_all(rows, meta, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, stem(meta))
    write_jsonl(rows, base + ".jsonl")
    with open(base + ".md", "w") as f:
        f.write(markdown(rows, meta))
    plot(rows, base + ".png")
    return base
