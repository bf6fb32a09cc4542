"""The `ssb` command line."""
