"""Hydra configurations of ``gblr train`` (experiments under ``experiment/``)."""
