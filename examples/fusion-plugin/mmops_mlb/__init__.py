"""An example mmops plugin package: one fusion, registered through the ``mmops.fusions`` entry point."""
