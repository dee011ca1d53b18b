"""Datasets, manifests, patient-wise folds and synthetic CT phantoms."""
