"""What a cluster's control plane does to ordinary YAML before kube-proxy sees it, for the
manifest source only: API-server defaults, cluster IP and node port allocation, Endpoints
mirrored to EndpointSlices. Raw dicts in, raw dicts out, as the API server would store them."""
