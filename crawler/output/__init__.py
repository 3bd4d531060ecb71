"""Output: the writer, shards and their manifest, the seen-set, recovery, verify, the layout."""
