"""This process's live connections: the hub's fan-out, the wire encodings, presence and the engine's jobs."""
