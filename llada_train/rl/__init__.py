"""Reinforcement learning for LLaDA2.x (EBPO, SPEC section 5).

Modules: `rewards` (answer checkers selected by name, shared with evaluation) and `sandbox`
(running untrusted model code). Import from the submodules; this package imports nothing so that
loading one concern does not pull in the others.
"""
