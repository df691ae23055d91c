"""Storage backends: the ReplicaClient protocol (base.py) and one module per backend."""
