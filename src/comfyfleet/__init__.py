"""comfyfleet: a job gateway in front of a fleet of ComfyUI servers."""
