"""Entry points of the MLflow project: a click CLI, one thin module per entry point."""
