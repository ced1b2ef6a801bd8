"""The C3D network, batched across videos, and the extract-features run that writes the seed's tree."""
