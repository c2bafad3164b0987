"""Experiments on a route: variants, sticky assignment, sequential tests, promotion and
rollback."""
