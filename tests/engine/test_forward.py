"""The forward-pass policy: batches padded to a few shapes, outputs trimmed."""

from __future__ import annotations

import torch

from app.core.sampling import pass_rows
from app.engine.forward import forward_pass


def test_batches_are_padded_to_a_few_shapes_and_trimmed() -> None:
    assert [pass_rows(n) for n in (1, 2, 3, 5, 64, 65, 256)] == [4, 4, 4, 8, 64, 128, 256]
    seen: list[int] = []

    class Net:  # the smallest stand-in render() needs: records the batch it was given
        def generate(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            seen.append(len(z))
            return torch.tanh(z[:, :1, None, None])

    class Model:
        device = torch.device("cpu")
        num_classes = 10
        image_shape = (1, 1, 1)
        label_filter = None
        net = Net()

    run = forward_pass(Model(), torch.float32)
    z, labels = torch.arange(5.0)[:, None], torch.zeros(5, dtype=torch.int64)
    out = run(z / 10, labels, torch.ones(5))
    assert seen == [8] and len(out) == 5  # one forward pass of 8, five answers
