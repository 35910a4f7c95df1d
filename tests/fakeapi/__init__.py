"""A strict Kubernetes list/watch test server for kubelab's tests (see :mod:`fakeapi.server`).

Importable from any test as ``fakeapi`` (``tests/`` is on ``sys.path``
because ``tests/conftest.py`` lives there).
"""

from .server import FakeAPIServer, Fault, RequestRecord, status_body
from .store import RESOURCES, ResourceType, Store
from .tls import PKI, make_pki

__all__ = ["FakeAPIServer", "Fault", "RequestRecord", "status_body", "RESOURCES", "ResourceType", "Store", "PKI", "make_pki"]
