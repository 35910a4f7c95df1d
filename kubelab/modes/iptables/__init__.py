"""iptables."""
