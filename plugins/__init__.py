"""Built-in encoders and fusions, installed as ``mmops_plugins`` and registered through entry points."""
