"""Deep-hashing models, heads and losses for remote-sensing CBIR."""
