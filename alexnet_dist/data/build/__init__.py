"""Building shards: sources (ILSVRC-2012, ImageFolder, Fashion-MNIST idx files) -> tar shards + manifest."""
