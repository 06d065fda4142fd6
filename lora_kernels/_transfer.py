"""Small host lists to the device without stalling the host."""
import torch


def to_device_async(values, dtype: torch.dtype, device) -> torch.Tensor:
    """`values` as a tensor on `device`. A copy from ordinary (pageable) host memory makes the host wait until
    the stream has drained; from pinned memory it is queued like a kernel (PyTorch keeps the pinned block alive
    until the copy has run)."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
