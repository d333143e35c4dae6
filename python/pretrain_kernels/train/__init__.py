"""Training utilities: embedded corpora (no downloads) and, later, the training loop."""
