"""facesynth shared contracts: config loading, storage URIs, shard datasets, CLI."""
