"""Deep CBIR systems of the survey's Table 1, each a descriptor method of the benchmark."""
