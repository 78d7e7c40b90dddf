"""An MoE from dense donors (seed 004, moetify): plan, routers, build, export, live mix.
"""
