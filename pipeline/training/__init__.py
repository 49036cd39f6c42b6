"""The training layer: data, model, strategy, the run of one training and its evaluation."""
