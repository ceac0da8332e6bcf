"""Stage 1: dataset integrity, fingerprint, plans."""
