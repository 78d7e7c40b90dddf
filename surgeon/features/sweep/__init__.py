"""The component-transfer sweep (seed 000): the grid runner and its report.
"""
