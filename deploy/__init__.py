"""Deployment tooling: certificates and node keys (`certs`), a local TLS + node-auth launcher (`launch`),
private networks of Linux network namespaces (`netns`).

See docs/deployment.md. Nothing here is imported by the app itself (clients/, strategies/, fedmeta/).
"""
