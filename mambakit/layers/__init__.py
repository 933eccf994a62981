"""mambakit.layers"""
