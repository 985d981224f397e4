"""Stage 1, data: frames in, validated shards out (shard format, images, object store,
ingest, validation and the built-in stream simulator)."""
