"""Reasoning output parsers (``--reasoning-parser``), one format per module, found by name
(``factory.py``)."""
