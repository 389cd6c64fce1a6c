"""The serving process tree: the supervisor and its workers."""
