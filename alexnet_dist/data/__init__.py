"""Data: manifests, shards read as tar streams, the epoch plan, augmentation, the loader, shard building."""
