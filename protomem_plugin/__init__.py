"""Prototype Memory heads for InsightFace arcface_torch."""

__version__ = "0.1.0"
