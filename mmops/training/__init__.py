"""Training engineering: data loading, batching, the loop, early stopping, checkpoints."""
