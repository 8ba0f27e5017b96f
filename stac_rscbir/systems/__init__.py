"""The survey's deep CBIR systems (Table 1), one module per paper, each a descriptor method."""
