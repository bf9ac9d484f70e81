"""Training infrastructure: EMA, atomic checkpoints, torchrun helpers (the loop arrives with its issue)."""
