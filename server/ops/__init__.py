"""What operators see: JSON logs and Prometheus metrics."""
