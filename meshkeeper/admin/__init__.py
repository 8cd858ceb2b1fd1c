"""The control plane's admin API: generated code of proto/meshkeeper/admin/v1 (``make proto``)."""
