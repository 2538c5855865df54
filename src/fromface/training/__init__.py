"""Training: the FROM loss, the trainer and its data plumbing."""
