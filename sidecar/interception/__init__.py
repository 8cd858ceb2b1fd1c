"""Transparent interception: the kernel rules that steer an unmodified app's traffic to the sidecar.

``meshkeeper iptables`` (DESIGN §10) installs them in the pod's network namespace, as Istio's
istio-iptables and Linkerd's proxy-init do; the sidecar's listeners then read where a redirected
connection was going with :func:`original_dst`.

- :mod:`.rules`: :class:`CaptureConfig` (validated, frozen) and the pure rule generator.
- :mod:`.ruleset`: reading ``iptables-save`` output and planning one ``iptables-restore --noflush``
  transaction that installs, updates or removes our rules and leaves everyone else's alone.
- :mod:`.apply`: running ``iptables-save``/``iptables-restore`` (and the ip6tables pair).
- :mod:`.iptables`: the command line.
- :mod:`.original_dst`: ``SO_ORIGINAL_DST`` for a redirected socket.
"""

from sidecar.interception.original_dst import original_dst

__all__ = ["original_dst"]
