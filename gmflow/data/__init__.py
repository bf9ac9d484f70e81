"""Data: the exact 2-D checkerboard of the toy (``checkerboard``) and the latent-shard pipeline."""
