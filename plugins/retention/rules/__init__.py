"""Rules: YAML rule files, validated into typed models (fields, models, loader, problems)."""
