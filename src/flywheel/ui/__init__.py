"""The web UI: server-rendered Jinja2 pages enhanced with HTMX and Chart.js.

The front-end libraries come from npm at build time (``python -m flywheel.ui.assets``) and
are served from ``/static/vendor``; nothing is fetched from a CDN when the UI runs.
"""
