"""Self-MoE gates between decoder layers (seed 003): training (train.py), selection (select.py), and
the use cases the command line and the workbench run (run.py).
"""
