"""elr-ingest: the command line over the `shards` format library."""
