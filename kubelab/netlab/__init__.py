"""netlab."""
