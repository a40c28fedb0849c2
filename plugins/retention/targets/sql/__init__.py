"""SQL targets: the table and its family, predicates, the keyset walk and its batches, crash
settlement, the journaled batch descriptor, one module per action."""
