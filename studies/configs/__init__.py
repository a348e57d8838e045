"""Study configs: each file defines `get_config() -> train.config.Config`."""
