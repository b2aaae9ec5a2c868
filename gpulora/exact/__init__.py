"""Exact attention gradients: the blocked path (:mod:`.attention`) and dense references (:mod:`.reference`)."""
