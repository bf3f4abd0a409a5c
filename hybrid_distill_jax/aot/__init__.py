"""Ahead-of-time compilation for hardware this host does not have: target descriptions (``targets``)
and the kernel plan read from a compiled GPU program (``kernels``). The command is
``python -m hybrid_distill_jax.compile``."""
