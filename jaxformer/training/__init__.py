"""Training: the train state, the one optimizer builder, the pure jitted step, checkpoints, the
loop, held-out evaluation, per-layer diagnostics, and starting from pretrained weights."""
