"""mambakit.training"""
