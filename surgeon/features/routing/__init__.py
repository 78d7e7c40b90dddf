"""Expert routing analysis (seed 002): the routing probe and its heatmap views.
"""
