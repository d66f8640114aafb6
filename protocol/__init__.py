"""cleanlease: protocol."""
