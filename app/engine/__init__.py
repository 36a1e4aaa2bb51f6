"""Serving without HTTP: model repository, micro-batcher, forward-pass policy, generation with filters, VAE
operations, dataset exports and archives, augmentation and background jobs."""
