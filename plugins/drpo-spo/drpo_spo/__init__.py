"""drpo-spo: the SPO objective as a drpo-lightning plugin (entry point ``spo``)."""

from drpo_spo.objective import SPO

__all__ = ["SPO"]
