"""The benchmark's pieces that run without a GPU: the CPU demo, the report writer, and a miniature of the
end-to-end fine-tune (peft vs patched from the same seed)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from lora_kernels.bench import cpu_demo, report


def test_cpu_demo_passes():
    lines = []
    assert cpu_demo.run(log=lines.append)
    assert any("timings need a GPU" in s for s in lines)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CLI runs its CPU demo on a machine without a GPU")
def test_benchmark_cli_runs_its_cpu_demo_as_the_readme_calls_it():
    # As a program, with TRITON_INTERPRET unset: the package (and triton) is imported before the CLI's main
    # runs, so the Triton rows need the program to start over with the setting (it once crashed there).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-m", "lora_kernels.bench", "--quick"], env=env, cwd=root,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "CPU demo passed" in run.stdout
    triton_rows = [line for line in run.stdout.splitlines() if line.strip().startswith("triton ")]
    assert len(triton_rows) == 3, run.stdout


def test_report_files(tmp_path):
    meta = dict(gpu="Test GPU 80GB", torch="x", triton="y", sha="abc1234", time="2026-11-23T12:00:00",
                copy_tbps=3.0, matmul_tflops=700.0)
    rows = []
    for prov, ms in (("base", 1.0), ("peft", 1.44), ("triton", 1.05)):
        rows.append(dict(op="lora_linear", provider=prov, mode="forward", M=8192, K=4096, N=4096, r=16,
                         dtype="bfloat16", dropout=0.0, p20_ms=ms, p50_ms=ms, p80_ms=ms, act_mib=None,
                         floor_ms=0.4, ratio=ms / 1.0, timing="events", **meta))
    base = report.write_all(rows, meta, str(tmp_path))
    assert base.endswith("test-gpu-80gb-20261123-abc1234")
    lines = open(base + ".jsonl").read().splitlines()
    assert [json.loads(s)["provider"] for s in lines] == ["base", "peft", "triton"]
    md = open(base + ".md").read()
    assert "| forward | 8192×4096×4096 | 16 | 0 | 1.0000 | 1.000 | 1.440 | 1.050 | 0.400 | 2.62 |" in md


def test_report_names_rows_where_auto_loses_to_addmm():
    meta = dict(gpu="g", torch="x", triton="y", sha="s", time="2026-11-23T12:00:00", copy_tbps=3.0,
                matmul_tflops=700.0)

    def rows(auto_ms):
        out = []
        for M in (16, 8192):
            for prov, ms in (("base", 1.0), ("addmm", 1.2), ("auto", auto_ms if M == 16 else 1.1)):
                out.append(dict(op="lora_linear", provider=prov, mode="forward", M=M, K=64, N=64, r=16, dropout=0.0,
                                p20_ms=ms * 0.9, p50_ms=ms, p80_ms=ms * 1.1, act_mib=None, floor_ms=0.5, ratio=ms))
        return out
    assert ("`auto` slower than `addmm` (median): forward 16×64×64 p=0 (1.250×, beyond the p20-p80 spread)."
            in report.markdown(rows(1.5), meta))
    assert ("`auto` slower than `addmm` (median): forward 16×64×64 p=0 (1.042×, within the spread)."
            in report.markdown(rows(1.25), meta))
    assert "`auto` slower than `addmm` (median): at no row." in report.markdown(rows(1.1), meta)


def test_e2e_miniature_loss_curves_agree():
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from lora_kernels.bench import e2e
    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=32)
    curves = e2e.loss_curves(steps=40, batch=2, seq=16, config=cfg, device="cpu", dtype=torch.float32)
    peft_c, ours = curves["peft"], curves["patched"]
    assert abs(peft_c[0] - ours[0]) < 0.05 * peft_c[0]           # same weights, data; masks differ
    assert ours[-1] < ours[0] and peft_c[-1] < peft_c[0]
    tail = slice(-10, None)
    assert abs(sum(peft_c[tail]) - sum(ours[tail])) / 10 < 0.1 * peft_c[0]


def test_e2e_interleaved_rounds_on_cpu():
    """The interleaved measurement: every provider timed in every round, one row each, ratios to the first,
    and the report renders the speed-up with its per-round range."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from lora_kernels.bench import e2e, report
    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=32)
    variants = [("peft", False, False, "auto"), ("patched", True, False, "torch")]
    rows = e2e.measure(variants, batch=2, seq=8, rounds=3, steps=2, config=cfg, device="cpu", dtype=torch.float32,
                       log=lambda *_: None)
    assert [r["provider"] for r in rows] == ["peft", "patched"]
    assert rows[0]["ratio"] == 1.0 and rows[0]["speedup_min"] == rows[0]["speedup_max"] == 1.0
    for r in rows:
        assert r["rounds"] == 3 and r["steps_per_round"] == 2
        assert 0 < r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"]
        assert r["speedup_min"] <= r["speedup_max"]
    md = report.markdown(rows, dict(gpu="cpu", torch=torch.__version__, triton="-", sha="x", time="d",
                                           copy_tbps=1.0, matmul_tflops=1.0))
    assert f"| patched | {rows[1]['p50_ms']:.1f} |" in md and "–" in md


def test_e2e_qlora_pair_on_cpu():
    """QLoRA providers: the target linears become bitsandbytes NF4 layers, peft's 4-bit LoRA layers serve them,
    and the patched model fuses every one of them (nothing kept on peft's forward)."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    bnb = pytest.importorskip("bitsandbytes")
    from lora_kernels.bench import e2e, report
    cfg = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=32)
    model, _, _ = e2e.build(True, False, cfg, device="cpu", dtype=torch.float32, backend="torch", four_bit=True)
    layers = [m for m in model.modules() if hasattr(m, "_lora_kernels_patched")]
    assert len(layers) == 7 and all(type(m.get_base_layer()) is bnb.nn.Linear4bit for m in layers)
    variants = [("qlora_peft", False, False, "auto"), ("qlora_patched", True, False, "torch")]
    rows = e2e.measure(variants, batch=2, seq=8, rounds=2, steps=1, config=cfg, device="cpu", dtype=torch.float32,
                       log=lambda *_: None)
    assert [r["provider"] for r in rows] == ["qlora_peft", "qlora_patched"]
    md = report.markdown(rows, dict(gpu="cpu", torch=torch.__version__, triton="-", sha="x", time="d",
                                    copy_tbps=1.0, matmul_tflops=1.0))
    assert "speed-up vs qlora_peft" in md


@pytest.mark.gpu
def test_merge_model_bench_rows_and_table():
    from lora_kernels.bench import merge_model_bench
    rows = merge_model_bench.run(blocks=1, log=lambda s: None)
    assert [r["provider"] for r in rows][:4] == ["copy", "grouped", "per_layer_triton", "peft"]
    assert all(r["M"] == 7 and r["p50_ms"] > 0 for r in rows)
    md = report.markdown(rows, dict(gpu="g", torch="t", triton="-", sha="x", time="d", copy_tbps=1.0,
                                    matmul_tflops=1.0))
    assert "Whole-model merge (7 Llama-2-7B-shaped linears, r=16)" in md
