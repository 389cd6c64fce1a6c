"""Durable events: storing them with gapless offsets, and hearing of them from every process (LISTEN/NOTIFY)."""
