"""Batch jobs: many rows (JSONL / Parquet / CSV / a folder of media) through one ``LLM`` with continuous batching,
written exactly once to JSONL or Parquet; locally (job.py) or on a Ray cluster (ray_runner.py)."""
