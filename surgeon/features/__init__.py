"""Use cases, each written once for the command line and the workbench alike:
export, sweep, routing, mix, compress, gates, distance.
"""
