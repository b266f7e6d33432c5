"""job layer."""
