"""The survey's traditional (hand-crafted) descriptors, section 2: see ``base`` for the contract
and ``registry`` for the named methods."""
