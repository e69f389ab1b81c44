"""
Running encoders: processes (ProcessProtocol), probing inputs with ffprobe,
parsing progress, and verifying outputs.  It speaks no HTTP.
"""
