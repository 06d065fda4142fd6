"""Benchmark CLI: python -m lora_kernels.bench [--quick] [--modes ...] [--providers ...] [--out DIR]."""
