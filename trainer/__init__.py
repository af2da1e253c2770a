"""Everything that trains: config, data, models, engines, the loop, checkpoints and stages."""
