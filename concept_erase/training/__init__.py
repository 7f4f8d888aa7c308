"""The Accelerate trainer (knows no method and no model family), its checkpoints, the cached latent
banks, the original model without a second copy, trainable subsets, seeded streams, device checks."""
