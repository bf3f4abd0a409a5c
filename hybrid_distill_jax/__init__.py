"""Hybrid Distill in JAX/Flax: a ViT student distilled from a supervised/CL teacher and a MIM teacher."""

__version__ = "0.1.0"
