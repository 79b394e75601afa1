"""PyREPL3 kernels on other hosts: the kernel side of gateway_provisioners'
launch protocol (:mod:`.handshake`, :mod:`.launcher`), the kernel's state on
object storage (:mod:`.statestore`), kernelspecs for the remote provisioners
(:mod:`.kernelspecs`) and moving a kernel between hosts (:mod:`.move`).

Nothing here schedules or transports anything: the provisioner (SSH,
Kubernetes, Docker) places the kernel, fsspec carries the state.
"""
