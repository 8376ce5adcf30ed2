"""Jobs: what ``quikft`` commands run, built from the layers below them (``quant``, ``format``, ``nn``, ``eval``).

``jobs.quantize`` is the quantize job and its machinery (weights read block by block, output written
block by block, the resumable state, the quick-evaluation streams).
"""
