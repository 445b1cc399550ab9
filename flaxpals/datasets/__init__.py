"""Reading task data: `reader` (the checked parser), `cs224n` (files, checksums, TFDS builders)."""
