"""Built-in task plugins: classification, multi-label and regression, registered like any third-party task."""
