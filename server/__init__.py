"""Herald's engine: everything but HTTP handler code."""
