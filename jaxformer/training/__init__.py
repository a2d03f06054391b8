"""Training: optimizer, train state, the pure jitted step, checkpoints and the loop."""
