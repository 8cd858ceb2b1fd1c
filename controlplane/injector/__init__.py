"""Kubernetes sidecar injection (DESIGN §10): ``meshkeeper inject`` and ``meshkeeper injector``.

``patch`` is the pure part (a pod in, the injected pod out, or the reason it is left alone),
``diff`` turns the two into an RFC 6902 JSONPatch, ``workloads`` finds the pod templates in
Deployments, Jobs and the rest, ``inject`` is the istioctl-kube-inject-style command and
``webhook`` the mutating admission webhook. None of it talks to the Kubernetes API.
"""
