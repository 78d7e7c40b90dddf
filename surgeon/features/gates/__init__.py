"""Self-MoE gates between decoder layers (seed 003): training and selection.
"""
