"""mambakit.models"""
