"""Training: building the RLlib algorithm from a Hydra config, running it, recording metrics."""
