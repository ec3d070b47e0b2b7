"""OpenTelemetry tracing and trajectory rendering."""
