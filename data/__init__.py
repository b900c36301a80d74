"""Dataset preparation: raw media or precomputed features -> ArrayRecord shards (see docs/data_format.md)."""
