"""kvfuse conformance suite: the cases every device plugin must pass (see issue 3)."""
