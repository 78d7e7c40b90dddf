"""An MoE from dense donors (Lee, Wynter and Ganti 2024: moetify): plan, routers, build, export, live mix.
"""
