"""Dagster wiring of the refusal study: definitions, resources, IO manager, partitions, sensors and the CLI."""
