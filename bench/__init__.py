"""Herald's benchmarks. Run the fan-out benchmark with `python -m bench.fanout`."""


class BenchError(Exception):
    """A failure that ends one target's measurements, worded for the person running the bench."""
