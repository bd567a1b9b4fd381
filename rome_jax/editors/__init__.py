"""Batch editors: closed forms that write many facts into one model at once (MEMIT, EMMET,
AlphaEdit), each a pure function returning low-rank factors Δw = left @ right."""
