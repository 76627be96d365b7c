"""Experiment configurations: one ml_collections file per published system."""
