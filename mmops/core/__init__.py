"""Model code: the plugin contracts, the model, metrics, discovery and conformance of plugins."""
