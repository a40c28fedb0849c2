"""Evidence: the audit schema, signing, certificate payloads, the chain, verification, checkpoints."""
