"""The model of a surgery: architectures (as data), anatomy, donors, plans, resolution, sessions,
the workbench's edit model and its recovery file. No torch: these answer from headers.
"""
