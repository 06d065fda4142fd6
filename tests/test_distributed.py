"""A patched peft model under DDP and FSDP2 (fully_shard) on two processes: losses and adapter gradients match a
single-process run over the whole batch. On the CPU (gloo, reference backend) everywhere; on two GPUs (NCCL,
the GPU kernels picked by backend="auto") where a machine has them."""
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
sys.path.insert(0, os.path.dirname(__file__))


def _model(device="cpu"):
    import lora_kernels as lk
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    m = peft.get_peft_model(transformers.LlamaForCausalLM(cfg),
                            peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                            target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    return lk.patch(m.to(device), backend="torch" if device == "cpu" else "auto")


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 64, (4, 10), generator=g)


def _adapter_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _worker(rank, world, port, mode, device, out):
    # NVLink multicast stays off (NCCL_NVLS_ENABLE=0): it is not needed here and can disturb shared hosts.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NCCL_NVLS_ENABLE="0")
    if device == "cuda":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group("gloo" if device == "cpu" else "nccl", rank=rank, world_size=world)
    try:
        model = _model(device)
        ids = _batch().chunk(world)[rank].to(device)
        if mode == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard
            for layer in model.base_model.model.model.layers:
                fully_shard(layer)
            wrapped = fully_shard(model)
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {}
        for n, p in model.named_parameters():
            if p.requires_grad:
                g = p.grad
                g = g.full_tensor() if hasattr(g, "full_tensor") else g
                grads[n] = g.detach().clone()
        losses = [torch.zeros((), device=device) for _ in range(world)]
        dist.all_gather(losses, loss.detach())
        if rank == 0:
            torch.save({"grads": {k: v.cpu() for k, v in grads.items()}, "loss": torch.stack(losses).mean().cpu()}, out)
        dist.barrier()  # neither rank tears down while the other may still be in a collective
    finally:
        dist.destroy_process_group()
    # Skip interpreter finalization: FSDP2's device mesh keeps the gloo group (and its worker threads' pending
    # work) alive past destroy_process_group, and tearing that down during finalization can abort the process.
    # The result is already on disk, so a hard exit loses nothing; a failure above still raises as usual.
    os._exit(0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TWO_GPUS = torch.cuda.is_available() and torch.cuda.device_count() >= 2
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu,
                                             pytest.mark.skipif(not TWO_GPUS, reason="needs two GPUs")])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_patched_model_distributed_matches_single_process(mode, device, tmp_path):
    out = str(tmp_path / "rank0.pt")
    from lora_kernels.bench.distributed import spawn
    spawn(_worker, (2, _free_port(), mode, device, out), 2, cpu=device == "cpu")
    got = torch.load(out, weights_only=True)
    model = _model(device)
    ids = _batch().to(device)
    # Each rank's loss is a mean over its own half; the gradient average equals the mean of the two halves.
    losses = []
    for half in ids.chunk(2):
        loss = model(input_ids=half, labels=half).loss
        (loss / 2).backward()
        losses.append(loss.detach())
    expect = {k: v.cpu() for k, v in _adapter_grads(model).items()}
    torch.testing.assert_close(got["loss"], torch.stack(losses).mean().cpu(), rtol=1e-5, atol=1e-6)
    assert got["grads"].keys() == expect.keys() and len(expect) == 16
    for k in expect:
        torch.testing.assert_close(got["grads"][k], expect[k], rtol=1e-4, atol=1e-6, msg=k)
