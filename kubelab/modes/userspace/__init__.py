"""userspace."""
