"""Prefect tasks: thin wrappers around pipeline.steps / pipeline.registry / pipeline.promotion that
add retries on transient I/O errors, caching keyed on content hashes, readable names and logging
through Prefect's run logger. Tasks pass paths, hashes and small dicts, never tensors."""
