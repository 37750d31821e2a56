"""Data: manifests, shards read as tar streams, the epoch plan, streams, decoders, augmentation, batches, the
loader, verification and shard building (``build/``)."""
