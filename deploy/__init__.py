"""Deployment tooling: certificates and node keys (`certs`), process trees and signal handling (`processes`,
also used by `fedmeta run`), the local TLS + node-auth deployment (`deployment`) and its command line
(`launch`), private networks of Linux network namespaces (`netns`).

See docs/deployment.md. Nothing here imports Flower (it runs Flower's commands), and the app itself (clients/,
strategies/) never imports this package.
"""
