"""mambakit.inference"""
