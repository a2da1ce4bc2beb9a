"""mmops: multimodal MLOps — versioned data, pluggable encoders and fusions, flows, registry, serving."""

__version__ = "0.1.0"
