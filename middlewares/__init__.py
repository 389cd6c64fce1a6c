"""Cross-cutting request processing, one concern per module."""
