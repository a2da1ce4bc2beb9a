"""The `mmops` command line: thin over the library's functions."""
