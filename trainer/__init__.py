"""Trainer: unsupervised anomaly-detection models trained on good parts, evaluated and exported."""
