"""Live models: devices and dtypes, the one model loader, the hybrid that hot-swaps tensors.
"""
