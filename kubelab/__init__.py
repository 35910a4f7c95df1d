"""kubelab: a Kubernetes service dataplane in Python."""

__version__ = "0.1.0"
