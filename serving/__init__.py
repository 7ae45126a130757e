"""Serving: load a registered model once, validate input against it, predict fast (API and batch)."""
