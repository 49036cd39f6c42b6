"""The experiments layer: an experiment's runs ranked, compared, swept, registered and served."""
