"""What the proxy reports about itself: one record (and JSON log line) per request, and the metrics."""
