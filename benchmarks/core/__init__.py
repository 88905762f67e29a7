"""What every benchmark shares: tasks and their data, models, run specs, the method registry, training, source
stages and one run (`runner.run`)."""
