"""`make cluster`: the service run from its images as the rendered manifests of
deploy/overlays/local say, with podman standing in for Kubernetes (plan: the manifests;
podman: the commands; kubelet: pods and probes; dns and endpoints: the Services' names;
front: the gateway's load balancer; cluster: the whole run; images: the test-only images)."""
