"""The component-transfer sweep (Tiwari 2026, docs/references.md): the grid runner and its report.
"""
