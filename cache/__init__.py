"""The Redis serving copy: per-user membership sets and the segment registry."""
