"""An example third-party package: an ordinal regression task and an attentive-pooling fusion."""
