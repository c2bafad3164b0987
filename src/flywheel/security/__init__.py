"""Security: API keys, projects, users and roles, secrets and the audit log."""

from flywheel.security.access import AccessError, AccessService
from flywheel.security.keys import ApiKeyStore, AuthenticatedKey, generate_key, hash_key
from flywheel.security.rbac import Permission, Principal

__all__ = [
    "AccessError",
    "AccessService",
    "ApiKeyStore",
    "AuthenticatedKey",
    "Permission",
    "Principal",
    "generate_key",
    "hash_key",
]
