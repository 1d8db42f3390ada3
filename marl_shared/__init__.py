"""marl-shared: multi-task multi-agent RL with one shared decision backbone."""

__version__ = "0.1.0"
