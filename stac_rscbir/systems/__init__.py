"""The survey's deep CBIR systems (Table 1), one module per paper, as descriptor methods."""
