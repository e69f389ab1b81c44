"""
The HTTP face of the service: the Site and its early-routing Request, upload
bodies streamed to disk (pump and spool), the resources, downloads, auth,
metrics and webhooks.
"""
