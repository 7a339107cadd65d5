"""eap-bench benchmark: attribution vs exact patching (run, report, figures, gate)."""
