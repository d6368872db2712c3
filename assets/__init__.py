"""Dagster software-defined assets: thin wrappers that move tables between refusal_core and the warehouse."""
