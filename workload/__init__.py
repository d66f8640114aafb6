"""cleanlease: workload."""
