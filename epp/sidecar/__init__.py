"""The P/D decode-pod sidecar (`epp sidecar`): see `epp.sidecar.server`."""
