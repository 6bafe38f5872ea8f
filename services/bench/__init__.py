"""`epdserve bench`: a serving benchmark client in the shape of vLLM's `bench serve`."""
