"""Task streams: forgetting metrics, training dynamics per module, FPF and k-FPF."""
