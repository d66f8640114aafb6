"""cleanlease: host."""
