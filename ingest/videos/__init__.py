"""Videos in, clip stacks out: HMDB51 split files, decoding, HR and LR frames, optical flow, demo clips."""
