"""Benchmark streamd against Redis Streams and NATS JetStream.  Run ``python -m bench``."""
