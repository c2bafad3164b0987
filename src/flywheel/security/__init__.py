"""Security: API keys (hashed at rest) and session signing for the UI."""

from flywheel.security.keys import ApiKeyStore, AuthenticatedKey, generate_key, hash_key

__all__ = ["ApiKeyStore", "AuthenticatedKey", "generate_key", "hash_key"]
