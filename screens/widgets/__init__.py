"""Widgets of the workbench: the Line-API grid and the status line."""
