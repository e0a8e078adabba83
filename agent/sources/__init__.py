"""Sources turn the outside world into ObjectChange events; no BPF, no model logic.

manifests.py: a directory of Kubernetes YAML (the embedded default)."""
