"""The tracking layer: everything that talks to MLflow or keeps what a run holds."""
