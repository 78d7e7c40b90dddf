"""Expert routing analysis (XPERT, arXiv 2605.08842): the corpora it reads, the routing probe, its heatmap views, and
`run_routing` (the use case `moe-surgeon routing` runs, each model materialised for it through `probe_hybrid`;
the workbench reads the app's live hybrid through `probe_live`).
"""
