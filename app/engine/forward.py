"""The forward-pass policy the micro-batcher runs on the device thread: batch shapes padded to a few buckets,
autocast on CUDA in the configured dtype, and a batch split in two when CUDA runs out of memory."""

from __future__ import annotations

import numpy as np
import torch

from app.core.model import SyntheticModel
from app.core.sampling import render

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def bucket(size: int) -> int:
    """The next power of two: forward passes see a handful of batch shapes, so the backends' per-shape caches
    (oneDNN primitives, cuDNN plans) stay bounded instead of growing with every distinct batch size."""
    return 1 << max(size - 1, 0).bit_length()


def forward_pass(model: SyntheticModel, dtype: torch.dtype):
    """The forward pass the batcher runs on the device thread: batches padded to a bucket size; on CUDA
    out-of-memory it splits the batch."""

    def run(z: torch.Tensor, labels: torch.Tensor, truncation: torch.Tensor) -> np.ndarray:
        n, padded = len(z), bucket(len(z))
        if padded != n:  # pad with copies of the first sample; their outputs are dropped
            z, labels, truncation = (torch.cat([t, t[:1].expand(padded - n, *t.shape[1:])])
                                     for t in (z, labels, truncation))
        try:
            with torch.autocast(model.device.type, dtype=dtype, enabled=dtype != torch.float32):
                return render(model, z, labels, truncation[:, None], batch_size=padded)[:n]
        except torch.cuda.OutOfMemoryError:
            if len(z) == 1:
                raise
            torch.cuda.empty_cache()
            half = n // 2
            return np.concatenate([run(z[:half], labels[:half], truncation[:half]),
                                   run(z[half:n], labels[half:n], truncation[half:n])])

    return run
