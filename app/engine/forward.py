"""The forward-pass policy the micro-batcher runs on the device thread: one pass per batch (padded by `render` to
a few shapes), autocast on CUDA in the configured dtype, and a batch split in two when CUDA runs out of memory."""

from __future__ import annotations

import numpy as np
import torch

from app.core.model import SyntheticModel
from app.core.sampling import render

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def forward_pass(model: SyntheticModel, dtype: torch.dtype):
    """The forward pass the batcher runs on the device thread; on CUDA out-of-memory it splits the batch."""

    def run(z: torch.Tensor, labels: torch.Tensor, truncation: torch.Tensor) -> np.ndarray:
        n = len(z)
        try:
            with torch.autocast(model.device.type, dtype=dtype, enabled=dtype != torch.float32):
                return render(model, z, labels, truncation[:, None], batch_size=max(n, 1))
        except torch.cuda.OutOfMemoryError:
            if len(z) == 1:
                raise
            torch.cuda.empty_cache()
            half = n // 2
            return np.concatenate([run(z[:half], labels[:half], truncation[:half]),
                                   run(z[half:n], labels[half:n], truncation[half:n])])

    return run
