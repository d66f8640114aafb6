"""cleanlease: guest."""
