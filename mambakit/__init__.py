"""mambakit: selective state space models (Mamba, Mamba-2, hybrids) in readable, fast PyTorch."""

__version__ = "0.1.0"
