"""Memory bounds on what the per-sample routes materialise. Read at call time (``limits.MAX_BLOCK_ELEMENTS``), so a
test can lower them on this module and every route sees the change."""

# Bound on the elements of one materialised per-sample gradient block (per layer), to keep memory flat.
MAX_BLOCK_ELEMENTS = 16 * 1024 * 1024
# Bound on the unfolded conv inputs kept across the backward passes of one batch (the exact Fisher's classes).
MAX_CACHED_ELEMENTS = 4 * MAX_BLOCK_ELEMENTS
