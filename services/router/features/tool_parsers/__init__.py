"""Tool-call output parsers, one format per module, found by name (``factory.py``)."""
