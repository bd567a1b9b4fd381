"""ROME: requests, context templates, keys, key statistics, v*, the rank-one update, edits."""
