"""The MNIST MLP training pipeline: config, data, model, callbacks, training, reporting, registry.

A library: it never reads sys.argv and never prints; it logs through `logging`. The entry points
in `mlflow_project` are its only callers that talk to users.
"""
