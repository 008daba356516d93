"""The data plane of listener-cluster: everything an event touches.

Plain async classes, testable without Ray. The control plane (``cluster``) wraps them
in Ray actors; this package never imports ``cluster`` or ``ray``.
"""
