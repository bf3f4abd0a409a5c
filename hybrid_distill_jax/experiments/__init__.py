"""Runners built on the library: the demo chain, the small-scale study, model analysis and plots."""
