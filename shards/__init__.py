"""Shard format library: source discovery, tar and Zarr writers and readers, manifest, build, verify."""

__version__ = "0.1.0"
