"""Offline work: training data, training loops, quality evaluation and the model card. The server never imports it."""
