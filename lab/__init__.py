"""A testbed, not shipped: a Kubernetes node and its pods as network namespaces and cgroups.
`with Lab("t1") as lab: a = lab.add_pod("a"); a.start_server([80]);
lab.add_pod("c").tcp(a.ip, 80)`."""

from lab.cleanup import cleanup_stale
from lab.node import Lab
from lab.pod import Pod, RunningClient
from lab.podclient import ClientResult

__all__ = ["ClientResult", "Lab", "Pod", "RunningClient", "cleanup_stale"]
