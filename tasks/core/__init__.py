"""Helpers every stage shares: the recipe schema, the artifact store, hashing and tracking."""
