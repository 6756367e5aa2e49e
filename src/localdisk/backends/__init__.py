"""Storage backends, one module each; the registry (`localdisk.registry`) finds them by name."""
