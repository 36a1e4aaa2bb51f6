"""The networks: a conditional DCGAN, a conditional VAE and the small evaluator classifier."""

import math


def upsampling_steps(height: int, width: int) -> int:
    """How many ×2 stages take a small base grid (≥ 2 pixels) to the image size: 1 for 8×8, 2 for 28×28."""
    return max(1, min(4, int(math.log2(max(min(height, width), 4) / 4))))
