"""replicad: continuous backup of SQLite databases to object storage, restore to any transaction."""

__version__ = "0.1.0"
