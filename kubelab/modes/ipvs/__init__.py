"""ipvs."""
