"""Self-MoE gates between decoder layers (Self-MoE): training (train.py), selection (select.py), and
the use cases the command line and the workbench run (run.py).
"""
