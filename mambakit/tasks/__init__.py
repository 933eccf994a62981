"""mambakit.tasks"""
