"""SQL targets: the table's shape, predicates, the keyset walk, one module per action."""
