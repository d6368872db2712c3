"""DuckDB views and queries over the Parquet warehouse."""
