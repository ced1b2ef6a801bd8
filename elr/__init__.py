"""Model and data-loading code for the coupled two-stream eLR network."""
