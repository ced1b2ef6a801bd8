"""Clip sets for fine-tuning C3D: build-clips (build.py); the storage format is shards/clips.py."""
